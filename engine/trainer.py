"""The DeepSpeed pretraining loop: stream -> EchoFM (mask, encode, decode, losses) -> step.

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
micro-batches per rank. A micro-batch whose loss is non-finite on any rank is skipped on
every rank (no backward, no update), counted, and `train.max_nonfinite` of them in a row
abort the run with `NonFiniteLoss`. SIGTERM / SIGINT finish the current step, save a
checkpoint and return.

Failures are bounded and named: the process group times out after
`train.collective_timeout_s`; with several ranks a heartbeat (heartbeat.py) names a stalled
rank within `train.heartbeat_timeout_s` and ends the run. Damaged samples skipped by the
stream (data.on_error=skip) are printed as they are found, counted in metrics.jsonl and
summary.json, and stop the run beyond `data.max_dropped`. Resume hashes the checkpoint
first; auto-resume skips a damaged one for the previous complete one.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .errors import NonFiniteLoss, UserError


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    """The DeepSpeed engine (ZeRO, precision, accumulation, activation checkpointing)."""

    zero_stage: int = 0
    """ZeRO stage 0-3 (1: optimizer states sharded, 2: + gradients, 3: + parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 on GPUs, fp32 (or bf16) on CPU. fp16 uses dynamic loss scaling."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and rank."""
    activation_checkpointing: bool = False
    """Recompute encoder/decoder block activations in backward (model.set_grad_checkpointing)."""

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")


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


# ---------------------------------------------------------------- distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, int, torch.device]:
    """Join (or create) the process group; returns (rank, world_size, local_rank, device).

    Launchers (torchrun, deepspeed) set RANK/WORLD_SIZE/...; a lone process gets rank 0
    of 1 on a free local port. Without CUDA, DeepSpeed runs on its CPU accelerator (gloo).
    timeout_s: the process group's collective timeout (None: DeepSpeed's default).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    own_port = "MASTER_PORT" not in os.environ
    if "RANK" not in os.environ or own_port:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(verbose=False, **kw)
    if own_port:  # used for the rendezvous only; child processes must pick their own
        os.environ.pop("MASTER_PORT", None)
    return rank, world, local_rank, device


# ---------------------------------------------------------------- engine


def deepspeed_config(recipe, world_size: int) -> dict:
    """The DeepSpeed config dict from the recipe's data/optim/deepspeed sections."""
    ds = recipe.deepspeed
    return {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": recipe.data.batch_size * ds.grad_accum * world_size,
        "gradient_clipping": recipe.optim.clip_grad or 0.0,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the client's torch AdamW
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, recipe, *, world_size: int, total_steps: int | None = None,
                 param_groups: list[dict] | None = None):
    """DeepSpeed engine + client AdamW + warmup-cosine schedule for `model`.

    Returns (engine, optimizer, scheduler). `param_groups` overrides the default
    decay / no-decay groups (e.g. layer-wise lr decay in fine-tuning). Call
    `init_distributed()` first. The model is moved to the rank's device before the
    optimizer is built (fused AdamW needs CUDA parameters).
    """
    import deepspeed

    from .optim import build_scheduler, param_groups as default_groups, peak_lr

    if recipe.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("deepspeed.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(recipe.deepspeed.activation_checkpointing)
    if torch.cuda.is_available():
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    cfg = deepspeed_config(recipe, world_size)
    lr = peak_lr(recipe.optim, cfg["train_batch_size"])
    groups = param_groups if param_groups is not None else default_groups(model, recipe.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(recipe.optim.betas), eps=recipe.optim.eps,
                                  fused=torch.cuda.is_available() or None)
    scheduler = build_scheduler(optimizer, recipe.schedule, peak=lr,
                                total_steps=total_steps or recipe.train.steps)
    engine, ds_opt, _, ds_sched = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       lr_scheduler=scheduler, config=cfg)
    return engine, ds_opt, ds_sched


# ---------------------------------------------------------------- metrics helpers

# Dense bf16 peak TFLOP/s per device, by a substring of the device name (first match wins):
# H200 as measured on random data (DESIGN §7, = flops.H200_BF16_PEAK), the others vendor figures.
PEAK_BF16_TFLOPS = {"H200": 790.0, "GH200": 989.0, "H100": 989.0, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0, "3090": 71.0}


def peak_flops(cfg: TrainConfig) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s of one device, where the figure came from); None on CPU."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12, "train.peak_tflops"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12, f"table:{key}"
    return None, f"unknown device {name!r}: set train.peak_tflops"


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or the process's resident memory (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _all_max(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def cpu_threads(tc: TrainConfig, data) -> int:
    """torch threads for one CPU process (see TrainConfig.cpu_threads)."""
    if tc.cpu_threads is not None:
        return tc.cpu_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or launcher's) choice
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, cores // local - data.num_threads)


# ---------------------------------------------------------------- the loop


def pretrain(recipe, *, resume: str | None = None, stream=None) -> dict:
    """Run (or continue) pretraining for `recipe`; returns the run summary (also written
    to `<run>/summary.json` by rank 0).

    resume: None = fresh run (refuses a run folder that already has checkpoints),
    "auto" = newest complete checkpoint of this run if any, else fresh; a path = that
    checkpoint (a checkpoint, checkpoints/ or run folder).
    stream: used instead of a ClipStream of `recipe.data` when given (ClipStream's interface:
    __iter__, state_dict, load_state_dict, stats, epoch), e.g. clips replayed from GPU memory.
    """
    from echofm.loaders.stream import ClipStream

    from . import checkpoint as ckpt
    from .yaml_io import dump_yaml, to_dict
    from .flops import model_flops
    from .logging import MetricsLogger
    from .model import EchoFM
    from .optim import WarmupCosine

    recipe.validate()
    tc = recipe.train
    run_dir = Path(tc.out_dir) / recipe.name
    ckpt_root = run_dir / "checkpoints"
    recipe_dict = to_dict(recipe)

    start = _resume_point(resume, run_dir)
    rank, world, _, device = init_distributed(tc.collective_timeout_s)
    beat = _start_heartbeat(tc, run_dir, rank, world)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(tc, recipe.data))
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Same init on every rank; then a per-rank stream for masking.
    torch.manual_seed(tc.seed)
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    engine, _, scheduler = build_engine(model, recipe, world_size=world, total_steps=tc.steps)
    torch.manual_seed(tc.seed + 1 + rank)
    random.seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    if stream is None:
        stream = ClipStream(recipe.data, train=True, rank=rank, world_size=world, device=device)

    step, micro, nonfinite_total, elapsed_before = 0, 0, 0, 0.0
    if start is not None:
        state = ckpt.load(engine, start, rank=rank, world_size=world, recipe=recipe_dict, verified=True)
        step, micro = state["step"], state["micro"]
        nonfinite_total, elapsed_before = state["nonfinite_total"], state["elapsed"]
        stream.load_state_dict(state["stream"])  # epoch and position: the same next batch
        ckpt.set_rng_state(state["rng"])  # the same masks
        # The schedule's shape comes from the recipe (e.g. a run extended with more steps).
        fresh = WarmupCosine(warmup=recipe.schedule.warmup_steps, total=tc.steps,
                             floor=scheduler.lr_lambdas[0].floor)
        for fn in scheduler.lr_lambdas:
            fn.__dict__.update(vars(fresh))

    log = MetricsLogger(recipe.logging, run_dir, total_steps=tc.steps, start_step=step, enabled=rank == 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
        log.message(f"[echofm] {'resumed from ' + str(start) if start else 'fresh run'}: step {step}/"
                    f"{tc.steps}, {world} rank(s) on {device.type}, run folder {run_dir}")

    # SIGTERM (schedulers, torchrun) and SIGINT: finish the step, checkpoint, return.
    # A second Ctrl-C interrupts at once.
    stop = {"requested": False}

    def _on_signal(signum, _frame):
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["requested"] = True

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    flops_clip = model_flops(recipe.model, recipe.mask)["train_step"]
    peak, peak_src = peak_flops(tc)
    frames_per_clip = recipe.data.num_frames
    inject = set(tc.nan_inject)
    # DeepSpeed reports the grad norm only from its ZeRO / mixed-precision optimizers.
    own_norm = recipe.deepspeed.zero_stage == 0 and recipe.deepspeed.precision == "fp32"
    grad_norm = None
    last_saved = step if start is not None else -1

    def save() -> Path:
        nonlocal last_saved
        rank_state = {"step": step, "micro": micro, "rng": ckpt.rng_state(),
                      "stream": stream.state_dict(), "nonfinite_total": nonfinite_total,
                      "elapsed": elapsed_before + (time.perf_counter() - t_run)}
        path = ckpt.save(engine, ckpt_root, step, rank_state=rank_state, recipe=recipe_dict,
                         keep_last=tc.keep_last, rank=rank, world_size=world)
        last_saved = step
        return path

    it = iter(stream)
    drops = _Drops(stream, rank, log)
    t_run = time.perf_counter()
    acc = _Interval(decoded0=stream.stats["decoded_frames"])
    losses: list[tuple[int, float]] = []
    consecutive = 0
    stopped = False
    try:
        while step < tc.steps:
            t_step = time.perf_counter()
            target = engine.global_steps + 1
            step_loss, step_terms, n_ok, clips, data_wait = 0.0, {}, 0, 0, 0.0
            lr = float(engine.get_lr()[0])
            while engine.global_steps < target:  # micro-batches until one optimizer step
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:  # epoch done; the stream has moved to the next one
                    it = iter(stream)
                    batch = next(it)
                data_wait += time.perf_counter() - t0
                micro += 1
                clips += batch["video"].shape[0]
                out = engine(batch["video"])
                loss = out["loss"]
                if micro in inject:
                    loss = loss * float("nan")
                # One host sync per micro-batch; every rank must agree before a collective backward.
                finite = bool(torch.isfinite(loss.detach()).item())
                bad, = _all_max([0.0 if finite else 1.0], device, world)
                if bad:
                    nonfinite_total += 1
                    consecutive += 1
                    log.message(f"[echofm] step {step + 1}: non-finite loss on micro-batch {micro} "
                                f"(skipped; {consecutive} in a row, {nonfinite_total} in total)")
                    if consecutive >= tc.max_nonfinite:
                        raise NonFiniteLoss(
                            f"loss was non-finite for {consecutive} micro-batches in a row (at step "
                            f"{step + 1}, train.max_nonfinite={tc.max_nonfinite}); lower optim.base_lr, "
                            "use bf16 instead of fp16, or check the shards")
                    del out, loss
                    continue
                consecutive = 0
                # Read the forward's values now, while the host has just synced on it, so
                # no second sync waits for backward + step to drain.
                step_loss += float(loss.detach())
                for k, v in out.get("terms", {}).items():
                    step_terms[k] = step_terms.get(k, 0.0) + float(v)
                engine.backward(loss)
                if own_norm and engine.is_gradient_accumulation_boundary():
                    grad_norm = _grad_norm(engine.module)
                engine.step()
                n_ok += 1
            step += 1
            dt = time.perf_counter() - t_step
            step_loss /= n_ok
            acc.add(dt, data_wait, clips, step_loss, {k: v / n_ok for k, v in step_terms.items()})
            losses.append((step, step_loss))
            # One small all-reduce per step: the stop request and the dropped-sample counts.
            requested = drops.step([1.0 if stop["requested"] else 0.0], device, world)

            last = step == tc.steps
            if last or step % recipe.logging.every == 0:  # collective on every rank
                gnorm = grad_norm if own_norm else engine.get_global_grad_norm()
                decoded = stream.stats["decoded_frames"]
                metrics = acc.summary(decoded, frames_per_clip, device, world)
                mfu = (flops_clip * metrics["clips_per_s"] / (peak * world)
                       if peak and metrics["clips_per_s"] else None)
                metrics.update(lr=lr, grad_norm=None if gnorm is None else float(gnorm), mfu=mfu,
                               mfu_peak=peak_src, epoch=stream.epoch, nonfinite_total=nonfinite_total,
                               **drops.counts, memory_gib=round(memory_gib(device), 3))
                log.log(step, metrics)
                acc.reset(decoded)
            if log.should_plot(step):
                _plot(log, step, engine.module, batch["video"], out)
            log.progress(step, loss=step_loss, fps=clips * frames_per_clip * world / dt)

            if requested:
                path = save()
                log.message(f"[echofm] stop requested: saved {path} at step {step}; "
                            "continue with --resume auto")
                stopped = True
                break
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last:
                save()
        if not stopped and last_saved != step:
            save()
    except RuntimeError as e:
        raise _collective_error(e, tc) or e
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        log.close()
        if beat is not None:
            beat.stop()

    wall = time.perf_counter() - t_run
    summary = {"run_dir": str(run_dir), "steps": step, "stopped": stopped, "world_size": world,
               "resumed_from": str(start) if start else None,
               "last_checkpoint": str(ckpt.find_checkpoint(ckpt_root)),
               "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
               "nonfinite_total": nonfinite_total, **drops.counts, "wall_s": round(wall, 2),
               "train_s_all_sessions": round(elapsed_before + wall, 2),
               "steps_per_s": len(losses) / acc.total_time if acc.total_time else None,
               "sampled_fps": acc.total_clips * frames_per_clip * world / acc.total_time
               if acc.total_time else None,
               "data_wait_fraction": acc.total_wait / acc.total_time if acc.total_time else None}
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if drops.counts["damaged_samples"]:
            print(drops.summary_line(), flush=True)
    return summary


# ---------------------------------------------------------------- failure handling helpers


def _resume_point(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (hashed: damaged ones are skipped with a message when
    searching a folder, an error when named directly), or None for a fresh run."""
    from . import checkpoint as ckpt

    ckpt_root = run_dir / "checkpoints"
    say = print if os.environ.get("RANK", "0") == "0" else (lambda _m: None)
    if resume == "auto":
        start = ckpt.find_checkpoint(ckpt_root, check=True, log=say)
        if start is None and ckpt.complete_checkpoints(ckpt_root):
            raise UserError(f"{ckpt_root}: every checkpoint is damaged (see above); move them away to "
                            "start afresh, or resume from a copy with --resume PATH")
        return start
    if resume:
        start = ckpt.find_checkpoint(resume, check=True, log=say)
        if start is None:
            raise UserError(f"--resume {resume}: no complete checkpoint there")
        return start
    if ckpt.complete_checkpoints(ckpt_root):
        raise UserError(f"{run_dir}: already has checkpoints; continue it with --resume auto, or "
                        "pick another train.out_dir or name")
    return None


def _start_heartbeat(tc: TrainConfig, run_dir: Path, rank: int, world: int):
    """Several ranks: beat and watch (heartbeat.py); None for a lone process."""
    if world == 1:
        return None
    from . import checkpoint as ckpt
    from .heartbeat import Heartbeat

    def hint() -> str:
        last = ckpt.complete_checkpoints(run_dir / "checkpoints")
        return f"last complete checkpoint: {last[-1] if last else 'none'} (continue with --resume auto)"

    return Heartbeat(run_dir / "heartbeat", rank=rank, world_size=world, timeout_s=tc.heartbeat_timeout_s,
                     hint=hint).start()


def _collective_error(e: RuntimeError, tc: TrainConfig) -> UserError | None:
    """A process-group timeout as one line (the heartbeat usually names the rank first)."""
    text = str(e)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    first = next((ln.strip() for ln in text.splitlines() if "imed out" in ln or "imeout" in ln), text)
    return UserError(f"a collective did not complete within train.collective_timeout_s="
                     f"{tc.collective_timeout_s:g} s: another rank is stalled or died ({first[:200]})")


class _Drops:
    """Damaged samples the stream skipped (data.on_error=skip): each rank prints its own as
    they are found; every step all ranks sum the counts (in the all-reduce that also carries
    the stop request) and stop together beyond data.max_dropped."""

    def __init__(self, stream, rank: int, log) -> None:
        self.stream, self.rank, self.log = stream, rank, log
        self.announced = set(stream.damaged)  # a resumed run reported these already
        self.counts = {"dropped_total": 0, "damaged_samples": 0}

    def step(self, extra: list[float], device: torch.device, world: int) -> float:
        """All-reduce `extra` (summed) with the drop counts; returns the summed extra[0]."""
        damaged = self.stream.damaged
        for key in [k for k in damaged if k not in self.announced]:
            line = f"[echofm] rank {self.rank}: skipped damaged sample: {damaged[key]}"
            self.log.message(line) if self.rank == 0 else print(line, flush=True)
            self.announced.add(key)
        vals = _all_sum(extra + [float(len(damaged)), float(self.stream.stats["skipped"])], device, world)
        self.counts = {"dropped_total": int(vals[-1]), "damaged_samples": int(vals[-2])}
        self.stream.check_dropped(self.counts["damaged_samples"])
        return vals[0]

    def summary_line(self) -> str:
        c = self.counts
        return (f"[echofm] data.on_error=skip: {c['damaged_samples']} damaged sample(s) skipped "
                f"({c['dropped_total']} reads dropped); `echofm shards verify` names them all")


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients (before clipping)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@dataclass(kw_only=True, slots=True)
class _Interval:
    """This rank's timing, clip and loss sums since the last log line, plus run totals."""

    steps: int = 0
    time: float = 0.0
    wait: float = 0.0
    clips: int = 0
    loss: float = 0.0
    terms: dict = field(default_factory=dict)
    decoded0: int = 0
    total_time: float = 0.0
    total_wait: float = 0.0
    total_clips: int = 0

    def add(self, dt: float, wait: float, clips: int, loss: float, terms: dict) -> None:
        self.steps += 1
        self.time += dt
        self.wait += wait
        self.clips += clips
        self.loss += loss
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.total_time += dt
        self.total_wait += wait
        self.total_clips += clips

    def summary(self, decoded: int, frames: int, device: torch.device, world: int) -> dict:
        """Interval metrics: clips and frames summed over ranks, losses and times averaged."""
        keys = sorted(self.terms)
        vals = _all_sum([self.time, self.wait, float(self.clips), float(decoded - self.decoded0),
                         self.loss] + [self.terms[k] for k in keys], device, world)
        t, wait, clips, dec = vals[0] / world, vals[1] / world, vals[2], vals[3]
        n = max(self.steps, 1)
        return {"loss": vals[4] / world / n,
                **{f"loss_{k}": v / world / n for k, v in zip(keys, vals[5:])},
                "step_time_s": t / n, "data_wait_s": wait / n, "compute_s": (t - wait) / n,
                "data_wait_fraction": wait / t if t else None,
                "clips_per_s": clips / t if t else None,
                "sampled_fps": clips * frames / t if t else None,
                "decoded_fps": dec / t if t else None}

    def reset(self, decoded: int) -> None:
        self.steps, self.time, self.wait, self.clips, self.loss = 0, 0.0, 0.0, 0, 0.0
        self.terms = {}
        self.decoded0 = decoded


def _plot(log, step: int, model, video: torch.Tensor, out: dict) -> None:
    """Input / masked / reconstructed frames of clip 0 and its S / P matrices."""
    from .logging import reconstruction_rows

    rows = reconstruction_rows(model, video[:1], out)
    sim = out.get("sim")
    prior = out.get("prior")
    log.figures(step, rows, sim[0].detach().float().cpu().numpy() if sim is not None else None,
                prior[0].detach().float().cpu().numpy() if prior is not None else None)
