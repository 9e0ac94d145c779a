"""The DeepSpeed training loop: stream -> model -> loss -> step, for pretraining and fine-tuning.

`Trainer` is the loop (init / resume / train_step / log / save, read top to bottom like MAE's
`train_one_epoch`); `pretrain` runs it on EchoFM (mask, encode, decode, losses), and
`downstream/finetune.py` on a backbone + task head. Around it, one job each: distributed.py
(process group, DeepSpeed engine, heartbeat), step.py (one micro-batch), metrics.py (what is
logged), resume.py (where a run continues from).

One code path from a laptop to a cluster:

    echofm pretrain recipes/pretrain/echofm_tiny.yaml                  # one process (CPU or GPU)
    torchrun --standalone --nproc_per_node 8 -m echofm.engine.cli pretrain R      # one node
    deepspeed --num_gpus 8 --no_local_rank --module echofm.engine.cli pretrain R  # same, DS launcher
    # several nodes, run on every node (the run folder must be on a shared filesystem):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \
        --rdzv_id echofm -m echofm.engine.cli pretrain R --resume auto
    # or once, from HOST0, with a hostfile of lines "hostN slots=8" (passwordless ssh):
    deepspeed --hostfile hostfile --no_local_rank --module echofm.engine.cli pretrain R --resume auto

A lone process gets the rendezvous variables set here (free port, rank 0 of 1) and, with
no CUDA, DeepSpeed's CPU accelerator (gloo), so `echofm pretrain R` just works. Each rank
streams its own part of the shards (`ClipStream(rank=, world_size=)`).

Step semantics: `train.steps` counts optimizer steps; one step = `grad_accum` finite
micro-batches per rank. A micro-batch (`micro_step`: forward and loss, one host read, backward,
the engine's step; benchmarks/train.py times this same function) whose loss is non-finite on
any rank is skipped on every rank (no backward, no update), counted, and
`train.max_nonfinite` of them in a row abort the run with `NonFiniteLoss`. SIGTERM / SIGINT
finish the current step, save a checkpoint and return. `train.compile` compiles the blocks
and the loss (engine/compile.py: why the DeepSpeed step itself is not put in a CUDA graph);
a compile that fails on the first step falls back to eager with a warning.

Failures are bounded and named: the process group times out after
`train.collective_timeout_s`; with several ranks a heartbeat (heartbeat.py) names a stalled
rank within `train.heartbeat_timeout_s` and ends the run. Damaged samples skipped by the
stream (data.on_error=skip) are printed as they are found, counted in metrics.jsonl and
summary.json, and stop the run beyond `data.max_dropped`. Resume hashes the checkpoint
first; auto-resume skips a damaged one for the previous complete one.
"""
from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from echofm.loaders.stream import ClipStream

from . import checkpoint as ckpt
from . import phase_health
from .compile import CompileConfig, first_step_or_eager, is_compiled
from .distributed import Dist, build_engine, collective_error, cpu_threads, init_distributed, start_heartbeat
from .errors import NonFiniteLoss
from .flops import model_flops
from .logging import MetricsLogger, reconstruction_rows
from .metrics import Drops, IntervalStats, StepStats, grad_norm, memory_gib, peak_flops
from .model import EchoFM
from .provenance import provenance
from .resume import resume_changes, resume_point
from .step import MicroRead, micro_step, model_loss
from .yaml_io import dump_yaml, to_dict

__all__ = ["TrainConfig", "Trainer", "plot_reconstruction", "pretrain", "resume_point"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Length, checkpoints, determinism and failure handling of a pretraining run."""

    out_dir: str = "runs"
    """Runs go to `out_dir/<recipe name>/` (checkpoints, metrics.jsonl, tb/, figures/)."""
    steps: int = 100
    """Optimizer steps in the whole run (also the cosine schedule's length)."""
    seed: int = 0
    """Seeds model init (same on every rank) and masking (seed + rank)."""
    checkpoint_every: int = 50
    """Save every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after each save."""
    max_nonfinite: int = 5
    """Abort after this many non-finite losses in a row."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms (warn only): exact resume on CPU; off for GPU speed."""
    peak_tflops: float | None = None
    """Peak bf16 dense TFLOP/s of one device for MFU; None = from the device table."""
    cpu_threads: int | None = None
    """torch threads per process on CPU; None = OMP_NUM_THREADS if set, else this process's
    share of the cores minus the stream's decode threads (data.num_threads), at least 1:
    oversubscribed OpenMP threads spin and run several times slower."""
    collective_timeout_s: float = 600.0
    """Process-group timeout: a collective (all-reduce, barrier) that waits longer fails the run.
    Long enough for the slowest checkpoint write, during which the other ranks wait."""
    heartbeat_timeout_s: float = 60.0
    """Several ranks: a rank whose heartbeat is silent this long is named and the run ends
    (keep it below collective_timeout_s, so the stalled rank is named before the timeout)."""
    nan_inject: list[int] = field(default_factory=list)
    """Test hook: 1-based micro-batch numbers (counted over the run) whose loss becomes NaN."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """torch.compile of the blocks and of the loss (engine/compile.py); off by default."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {self.max_nonfinite}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 or null, got {self.cpu_threads}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0 or null, got {self.peak_tflops}")
        if not (self.collective_timeout_s > 0 and self.heartbeat_timeout_s > 0):
            raise ValueError("collective_timeout_s and heartbeat_timeout_s must be > 0, got "
                             f"{self.collective_timeout_s}, {self.heartbeat_timeout_s}")


class Trainer:
    """One DeepSpeed run of `model` on `stream`, pretraining or fine-tuning alike:

        trainer = Trainer(recipe, model, stream, dist=dist, run_dir=run_dir, steps=N, seed=s,
                          resume_from=checkpoint)  # optional: weights, optimizer, stream position, RNG
        summary = trainer.fit()      # train_step -> log -> save until step N (or SIGTERM)

    `loss_fn(engine, batch) -> (loss, terms, out)` is the forward (default `model_loss`);
    `figures(logger, step, module, batch, out)` draws PNGs every logging.plot_every steps.
    The model must have been initialised the same way on every rank (seed first). After
    `__init__` the run is open (metrics logger, recipe.yaml, the stream's iterator, clocks):
    `train_step()` and `log()` work without `fit()`; `close()` ends a run driven by hand.
    """

    def __init__(self, recipe, model: torch.nn.Module, stream, *, dist: Dist, run_dir: Path, steps: int,
                 seed: int, loss_fn=model_loss, param_groups: list[dict] | None = None, figures=None,
                 flops_per_clip: float | None = None, name: str = "pretrain", resume_from: Path | None = None) -> None:
        self.recipe, self.stream, self.dist, self.run_dir = recipe, stream, dist, Path(run_dir)
        self.tc, self.steps, self.loss_fn, self.figures, self.name = recipe.train, steps, loss_fn, figures, name
        self.heartbeat = start_heartbeat(self.tc, self.run_dir, dist.rank, dist.world)
        if dist.device.type == "cpu":
            torch.set_num_threads(cpu_threads(self.tc, recipe.data))
        if self.tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.engine, _, self.schedule = build_engine(model, recipe, world_size=dist.world, total_steps=steps,
                                                     param_groups=param_groups)
        # Compiled regions: the steps up to the first compiled backward fall back to eager on failure.
        self.compile_guard = is_compiled(self.engine.module)
        # From here on each rank draws its own random numbers (masks).
        self.seed = seed
        torch.manual_seed(seed + 1 + dist.rank)
        random.seed(seed + dist.rank)
        np.random.seed(seed + dist.rank)
        self.flops_per_clip, (self.peak, self.peak_src) = flops_per_clip, peak_flops(self.tc)
        # DeepSpeed reports the grad norm only from its ZeRO / mixed-precision optimizers.
        self.own_norm = recipe.deepspeed.zero_stage == 0 and recipe.deepspeed.precision == "fp32"
        self.step = self.micro = self.nonfinite_total = self.consecutive = 0
        self.elapsed_before, self.resumed_from, self.last_saved = 0.0, None, -1
        self.stop_requested = self._signalled = self.stopped = False
        self.grad_norm = None
        self.resume_notes: list[str] = []
        self.drops = Drops(stream, dist.rank)
        self.losses: list[float] = []
        self.collapse_warned = False
        if resume_from is not None:
            self._resume(resume_from)
        self.logger = self._open_logger()
        self._handlers: dict = {}  # fit's SIGTERM / SIGINT handlers, restored by close()
        self._it = iter(self.stream)
        if dist.device.type == "cuda":  # memory_gib: the peak since the last log line, this run's only
            torch.cuda.reset_peak_memory_stats(dist.device)
        self.t_run = time.perf_counter()
        self.interval = IntervalStats(decoded0=self.stream.stats["decoded_frames"])

    # -- init / resume ----------------------------------------------------------------

    def _resume(self, start: Path) -> None:
        """Continue from checkpoint `start`: model, optimizer, step counters, the stream's
        epoch and position (the same next batch) and every RNG (the same masks). The lr needs
        nothing: it is a function of the step."""
        d = self.dist
        meta = json.loads((Path(start) / ckpt.META).read_text())  # (resume_point checked it)
        notes = self._resume_changes(Path(start), meta)
        state = ckpt.load(self.engine, start, rank=d.rank, world_size=d.world, recipe=to_dict(self.recipe),
                          verified=True, elastic=True)
        self.step, self.micro = state["step"], state["micro"]
        self.nonfinite_total, self.elapsed_before = state["nonfinite_total"], state["elapsed"]
        self.stream.load_state_dict(state["stream"])
        if meta["world_size"] == d.world:
            ckpt.set_rng_state(state["rng"])
        else:  # other ranks: fresh per-rank streams (masks), still a function of (seed, step, rank)
            seq = np.random.SeedSequence([self.seed, self.step, d.rank]).generate_state(2)
            torch.manual_seed(int(seq[0]))
            random.seed(int(seq[1]))
            np.random.seed(int(seq[1]))
        self.resume_notes = getattr(self.stream, "resume_notes", []) + notes
        self.resumed_from, self.last_saved = start, self.step
        self.drops.announced |= set(self.stream.damaged)  # reported by the session that found them

    def _resume_changes(self, start: Path, meta: dict) -> list[str]:
        return resume_changes(self.recipe, self.dist.world, start, meta)

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until step `steps` (or a stop request: save and return); returns the summary."""
        self.engine.train()
        # SIGTERM (schedulers, torchrun) and SIGINT: finish the step, checkpoint, return.
        # A second Ctrl-C interrupts at once.
        self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.step < self.steps:
                self.log(self.train_step())
                if self.stop_requested:
                    path = self.save()
                    self.logger.message(f"[echofm] stop requested: saved {path} at step {self.step}; "
                                        "continue with --resume auto")
                    self.stopped = True
                    break
                if self._every(self.tc.checkpoint_every) or self.step == self.steps:
                    self.save()
            if not self.stopped and self.last_saved != self.step:
                self.save()
        except RuntimeError as e:
            raise collective_error(e, self.tc) or e
        finally:
            self.close()
        return self.summary()

    def train_step(self) -> StepStats:
        """One optimizer step: micro-batches (`micro_step`) until `grad_accum` of them had a
        finite loss on every rank. Each micro-batch costs one host read."""
        t0 = time.perf_counter()
        s = StepStats(lr=self.schedule.apply(self.engine.optimizer, self.step))  # a function of the step
        target = self.engine.global_steps + 1
        while self.engine.global_steps < target:
            batch, wait = self._next_batch()
            self.micro += 1
            s.wait += wait
            s.clips += batch["video"].shape[0]
            self.drops.announce(self.logger)
            read, out = self._micro_step(batch)
            self.stop_requested = self.stop_requested or read.extra[0] > 0
            self.drops.update(damaged=int(read.extra[1]), dropped=int(read.extra[2]))
            if not read.finite:
                self._skip_nonfinite()
                continue
            self.consecutive = 0
            s.add(read, batch["video"].shape[0])
        self.step += 1
        s.time = time.perf_counter() - t0
        s.batch, s.out = batch, out
        self.losses.append(s.loss / s.n / self.dist.world)
        return s

    def _next_batch(self) -> tuple[dict, float]:
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:  # epoch done; the stream has moved to the next one
            self._it = iter(self.stream)
            batch = next(self._it)
        return batch, time.perf_counter() - t0

    def _micro_step(self, batch: dict) -> tuple[MicroRead, dict | None]:
        """`micro_step` with this run's loss, ranks, extra read values ([stop request, damaged
        samples, dropped reads]), NaN injection and grad-norm hook; while `compile_guard`
        holds, a compile failure reverts to eager and reruns (engine/compile.py)."""
        step = partial(micro_step, self.engine, batch, self.loss_fn, world=self.dist.world,
                       extra=lambda: [float(self._signalled), *self.drops.local()],
                       poison=self.micro in self.tc.nan_inject, before_step=self._before_step)
        if not self.compile_guard:
            return step()
        read, out = first_step_or_eager(step, self.engine.module)
        self.compile_guard = not read.finite  # until one compiled backward and step have run
        return read, out

    def _before_step(self) -> None:
        if self.own_norm and self.engine.is_gradient_accumulation_boundary() and self._logs(self.step + 1):
            self.grad_norm = grad_norm(self.engine.module)  # a tensor: read when logged

    def _skip_nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.consecutive += 1
        self.logger.message(f"[echofm] step {self.step + 1}: non-finite loss on micro-batch {self.micro} "
                            f"(skipped; {self.consecutive} in a row, {self.nonfinite_total} in total)")
        if self.consecutive >= self.tc.max_nonfinite:
            raise NonFiniteLoss(f"loss was non-finite for {self.consecutive} micro-batches in a row (at step "
                                f"{self.step + 1}, train.max_nonfinite={self.tc.max_nonfinite}); lower "
                                "optim.base_lr, use bf16 instead of fp16, or check the shards")

    # -- log / save -------------------------------------------------------------------

    def _every(self, n: int) -> bool:
        return bool(n) and self.step % n == 0

    def _logs(self, step: int) -> bool:
        return step == self.steps or step % self.recipe.logging.every == 0

    def log(self, s: StepStats) -> None:
        """Interval metrics every logging.every steps (a collective: every rank calls it),
        figures every logging.plot_every steps, the progress bar every step."""
        frames, world = self.recipe.data.num_frames, self.dist.world
        self.interval.add(s)
        if self._logs(self.step):
            gnorm = self.grad_norm if self.own_norm else self.engine.get_global_grad_norm()
            decoded = self.stream.stats["decoded_frames"]
            m = self.interval.summary(decoded, frames, self.dist.device, world, flops_per_clip=self.flops_per_clip,
                                      peak=self.peak)
            m.update(lr=s.lr, grad_norm=None if gnorm is None else float(gnorm), mfu_peak=self.peak_src,
                     epoch=self.stream.epoch, nonfinite_total=self.nonfinite_total, **self.drops.counts,
                     memory_gib=round(memory_gib(self.dist.device), 3))
            m.update(self._phase_health(s))
            self.logger.log(self.step, m)
            self.interval.reset(decoded)
        if self.figures is not None and self.logger.should_plot(self.step):
            self.figures(self.logger, self.step, self.engine.module, s.batch, s.out)
        self.logger.progress(self.step, loss=self.losses[-1], fps=s.clips * frames * world / s.time)

    def _phase_health(self, s: StepStats) -> dict:
        """The collapse monitor's figures of the step's last micro-batch (engine/phase_health.py);
        one warning line when the branch first reads as collapsed."""
        h = phase_health.from_output(s.out)
        line = phase_health.warning(self.step, h)
        if line and not self.collapse_warned:
            self.logger.message(line)
        self.collapse_warned = self.collapse_warned or line is not None
        return h

    def save(self) -> Path:
        """Checkpoint this step (collective): engine + this rank's counters, stream state, RNG."""
        d = self.dist
        rank_state = {"step": self.step, "micro": self.micro, "rng": ckpt.rng_state(),
                      "stream": self.stream.state_dict(), "nonfinite_total": self.nonfinite_total,
                      "elapsed": self.elapsed_before + (time.perf_counter() - self.t_run)}
        path = ckpt.save(self.engine, self.run_dir / "checkpoints", self.step, rank_state=rank_state,
                         recipe=to_dict(self.recipe), keep_last=self.tc.keep_last, rank=d.rank, world_size=d.world)
        self.last_saved = self.step
        return path

    def summary(self) -> dict:
        """The run summary (rank 0 also writes it to `<run>/summary.json`)."""
        wall, acc, d = time.perf_counter() - self.t_run, self.interval, self.dist
        frames = self.recipe.data.num_frames
        out = {"run_dir": str(self.run_dir), "steps": self.step, "stopped": self.stopped, "world_size": d.world,
               "resumed_from": str(self.resumed_from) if self.resumed_from else None,
               "last_checkpoint": str(ckpt.find_checkpoint(self.run_dir / "checkpoints")),
               "first_loss": self.losses[0] if self.losses else None,
               "last_loss": self.losses[-1] if self.losses else None,
               "nonfinite_total": self.nonfinite_total, **self.drops.counts, "wall_s": round(wall, 2),
               "train_s_all_sessions": round(self.elapsed_before + wall, 2),
               "steps_per_s": len(self.losses) / acc.total_time if acc.total_time else None,
               "sampled_fps": acc.total_clips * frames * d.world / acc.total_time if acc.total_time else None,
               "data_wait_fraction": acc.total_wait / acc.total_time if acc.total_time else None,
               "provenance": provenance(self.recipe)}
        if d.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=1))
            if self.drops.counts["damaged_samples"]:
                print(self.drops.summary_line(), flush=True)
        return out

    # -- session ----------------------------------------------------------------------

    def _open_logger(self) -> MetricsLogger:
        """The metrics logger from this run's step on; rank 0 writes the run's recipe.yaml and
        says where the run starts."""
        d = self.dist
        logger = MetricsLogger(self.recipe.logging, self.run_dir, total_steps=self.steps, start_step=self.step,
                               enabled=d.rank == 0, desc=self.name, config=to_dict(self.recipe))
        if d.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_yaml(self.recipe))
            start = f"resumed from {self.resumed_from}" if self.resumed_from else "fresh run"
            logger.message(f"[echofm] {start}: step {self.step}/{self.steps}, {d.world} rank(s) on "
                           f"{d.device.type}, run folder {self.run_dir}")
            if self.resume_notes:
                logger.message(f"[echofm] note: resumed with {', '.join(self.resume_notes)}; the epoch goes "
                               "on from the clips all ranks had read, each sample once")
        return logger

    def _on_signal(self, signum, _frame) -> None:
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signalled = True

    def close(self) -> None:
        """Restore the signal handlers, close the metrics logger, stop the heartbeat."""
        for s, h in self._handlers.items():
            signal.signal(s, h)
        self._handlers = {}
        self.logger.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()


def pretrain(recipe, *, resume: str | None = None, stream=None) -> dict:
    """Run (or continue) pretraining for `recipe`; returns the run summary (also written
    to `<run>/summary.json` by rank 0).

    resume: None = fresh run (refuses a run folder that already has checkpoints),
    "auto" = newest complete checkpoint of this run if any, else fresh; a path = that
    checkpoint (a checkpoint, checkpoints/ or run folder).
    stream: used instead of a ClipStream of `recipe.data` when given (ClipStream's interface:
    __iter__, state_dict, load_state_dict, stats, epoch, damaged, check_dropped), e.g. clips
    replayed from GPU memory.
    """
    recipe.validate()
    tc = recipe.train
    run_dir = Path(tc.out_dir) / recipe.name
    start = resume_point(resume, run_dir)
    dist = init_distributed(tc.collective_timeout_s)
    torch.manual_seed(tc.seed)  # the same init on every rank
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    if stream is None:
        stream = ClipStream(recipe.data, train=True, rank=dist.rank, world_size=dist.world, device=dist.device)
    trainer = Trainer(recipe, model, stream, dist=dist, run_dir=run_dir, steps=tc.steps, seed=tc.seed,
                      figures=plot_reconstruction,
                      flops_per_clip=model_flops(recipe.model, recipe.mask, recipe.loss)["train_step"],
                      resume_from=start)
    return trainer.fit()


def plot_reconstruction(log, step: int, model, batch: dict, out: dict) -> None:
    """Input / masked / reconstructed frames of clip 0 and its S / P matrices."""
    rows = reconstruction_rows(model, batch["video"][:1], out)
    sim, prior = out.get("sim"), out.get("prior")
    log.figures(step, rows, sim[0].detach().float().cpu().numpy() if sim is not None else None,
                prior[0].detach().float().cpu().numpy() if prior is not None else None,
                note=phase_health.figure_note(phase_health.from_output(out)))
