"""The DeepSpeed training loop: stream -> model -> loss -> step, for pretraining and fine-tuning.

`Trainer` is the loop (init / resume / train_step / log / save, read top to bottom like MAE's
`train_one_epoch`); `pretrain` runs it on EchoFM (mask, encode, decode, losses), and
`downstream/finetune.py` on a backbone + task head.

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

import datetime
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from echofm.loaders.stream import ClipStream

from . import checkpoint as ckpt
from . import compile as C
from . import phase_health
from .compile import CompileConfig
from .errors import NonFiniteLoss, UserError
from .flops import device_peak, mfu, model_flops
from .heartbeat import Heartbeat
from .logging import MetricsLogger, reconstruction_rows
from .model import EchoFM
from .optim import LrSchedule, build_optimizer, peak_lr
from .optim import param_groups as default_groups
from .provenance import provenance
from .yaml_io import dump_yaml, to_dict

__all__ = ["DeepSpeedConfig", "Dist", "NonFiniteLoss", "TrainConfig", "Trainer", "build_engine",
           "init_distributed", "micro_step", "pretrain", "prepare_model"]


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
    """Recompute encoder/decoder block activations in backward (model.set_grad_checkpointing):
    less memory, about a third more compute; off wherever the batch fits without it."""

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


# ---------------------------------------------------------------- distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dist(NamedTuple):
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device


def init_distributed(timeout_s: float | None = None) -> Dist:
    """Join (or create) the process group (a no-op when joined); returns (rank, world_size,
    local_rank, device).

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
        if device.type == "cpu":
            _skip_shm_comm_op()
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(verbose=False, **kw)
    if own_port:  # used for the rendezvous only; child processes must pick their own
        os.environ.pop("MASTER_PORT", None)
    return Dist(rank, world, local_rank, device)


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU accelerator on plain gloo instead of its shared-memory comm op.

    That op only speeds all-reduce between CPU ranks of one host; our CPU runs are tests,
    CI and demos. Its first use JIT-compiles C++ (30-200 s on 2 cores), and a build that
    is killed leaves a lock file that torch waits on forever: every later run on that
    machine hangs in init_distributed (seen in CI). `__compatible_ops__` is the dict
    DeepSpeed consults before building it (its own comment: edits to it persist).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


def step_device() -> torch.device:
    """Where this process's step runs: its current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def prepare_model(model: torch.nn.Module, recipe, device: torch.device) -> torch.nn.Module:
    """The model as the recipe's step runs it, on `device`: activation checkpointing
    (deepspeed.activation_checkpointing) and torch.compile of its blocks and loss
    (train.compile, engine/compile.py). `build_engine` calls it; so does benchmarks/train.py
    where it runs the trainer's step without DeepSpeed."""
    mode = recipe.train.compile.mode
    if recipe.train.compile.enabled and mode in C.GRAPH_MODES and recipe.deepspeed.grad_accum > 1:
        raise UserError(f"train.compile.mode={mode!r} (CUDA graphs) needs deepspeed.grad_accum=1, got "
                        f"{recipe.deepspeed.grad_accum}: a replay reuses the memory of the last one's "
                        "gradients, which accumulation still holds; use mode 'default'")
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(recipe.deepspeed.activation_checkpointing)
    model = model.to(device)
    return C.compile_for_training(model, recipe.train.compile, device)


def build_engine(model: torch.nn.Module, recipe, *, world_size: int, total_steps: int | None = None,
                 param_groups: list[dict] | None = None) -> tuple[Any, torch.optim.Optimizer, LrSchedule]:
    """DeepSpeed engine + client AdamW + the lr schedule for `model`.

    Returns (engine, optimizer, schedule); `schedule.apply(engine.optimizer, step)` sets the
    lr before optimizer step `step` (the trainer does). `param_groups` overrides the default
    decay / no-decay groups (e.g. layer-wise lr decay in fine-tuning, each group with its
    own "lr"). Call `init_distributed()` first. The model is prepared (`prepare_model`: the
    rank's device, checkpointing, compile) before the optimizer is built (fused AdamW needs
    CUDA parameters).
    """
    import deepspeed

    if recipe.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("deepspeed.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    model = prepare_model(model, recipe, step_device())
    cfg = deepspeed_config(recipe, world_size)
    lr = peak_lr(recipe.optim, cfg["train_batch_size"])
    groups = param_groups if param_groups is not None else default_groups(model, recipe.optim.weight_decay)
    optimizer = build_optimizer(groups, recipe.optim, lr)
    schedule = LrSchedule.build(optimizer, recipe.schedule, peak=lr, total=total_steps or recipe.train.steps)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    schedule.apply(engine.optimizer, 0)
    return engine, ds_opt, schedule


# ---------------------------------------------------------------- metrics helpers

def peak_flops(cfg: TrainConfig) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s of one device, where the figure came from: train.peak_tflops, else
    flops.PEAK_BF16_TFLOPS by device name); None on CPU or an unknown device."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12, "train.peak_tflops"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    peak = device_peak(name)
    return (peak, f"table:{name}") if peak else (None, f"unknown device {name!r}: set train.peak_tflops")


def memory_gib(device: torch.device) -> float:
    """CUDA: the peak allocated memory since the last call (or the run's start), GiB: each call
    reads the peak, then resets it. CPU: the process's resident memory now, GiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
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


# ---------------------------------------------------------------- the trainer


def model_loss(engine, batch: dict) -> tuple[torch.Tensor, dict, dict]:
    """Pretraining's forward: EchoFM on the clip (masking, encode, decode, losses inside);
    -> (loss, its terms (detached scalars), the whole output for figures)."""
    out = engine(batch["video"])
    return out["loss"], out.get("terms", {}), out


class MicroRead(NamedTuple):
    """One micro-batch's numbers from the host read, summed over ranks."""

    loss: float
    terms: dict[str, float]
    finite: bool
    """The loss was finite on every rank."""
    extra: list[float]
    """The caller's extra values, summed over ranks."""


def host_read(loss: torch.Tensor, terms: dict, extra: Sequence[float], world: int) -> MicroRead:
    """The micro-batch's one device-to-host transfer: [loss, *terms, non-finite, *extra] as one
    float64 tensor, summed over ranks in one all-reduce (every rank must agree to skip a
    micro-batch before the collective backward)."""
    local = torch.tensor(list(extra), dtype=torch.float64)
    vals = torch.cat([torch.stack([t.detach().double() for t in (loss, *terms.values())]),
                      (~torch.isfinite(loss.detach())).double().reshape(1), local.to(loss.device, non_blocking=True)])
    if world > 1:
        torch.distributed.all_reduce(vals)
    v = vals.tolist()
    n = len(terms) + 1
    return MicroRead(loss=v[0], terms=dict(zip(terms, v[1:n])), finite=v[n] == 0, extra=v[n + 1:])


def micro_step(engine, batch: dict, loss_fn=model_loss, *, world: int = 1, extra=lambda: (), poison: bool = False,
               before_step=None) -> tuple[MicroRead, dict | None]:
    """The trainer's work on one micro-batch (MAE's train_one_epoch body), and what
    benchmarks/train.py times: forward and loss (`loss_fn(engine, batch) -> (loss, terms,
    out)`), the one host read (`host_read` of the loss, its terms and `extra()`), then, only
    when the loss was finite on every rank, `engine.backward(loss)`, `before_step()` and
    `engine.step()` (DeepSpeed updates at the accumulation boundary). poison: the loss becomes
    NaN (train.nan_inject). `engine`: a DeepSpeed engine, or anything with its `module`,
    `__call__`, `backward` and `step`. Returns (the read, the forward's output; None if skipped)."""
    C.step_begin(engine.module)  # a new iteration for CUDA-graph modes
    loss, terms, out = loss_fn(engine, batch)
    if poison:
        loss = loss * float("nan")
    read = host_read(loss, terms, extra(), world)
    if not read.finite:
        return read, None
    engine.backward(loss)
    if before_step is not None:
        before_step()
    engine.step()
    return read, out


class Trainer:
    """One DeepSpeed run of `model` on `stream`, pretraining or fine-tuning alike:

        trainer = Trainer(recipe, model, stream, dist=dist, run_dir=run_dir, steps=N, seed=s)
        trainer.resume(checkpoint)   # optional: weights, optimizer, stream position, RNG
        summary = trainer.fit()      # train_step -> log -> save until step N (or SIGTERM)

    `loss_fn(engine, batch) -> (loss, terms, out)` is the forward (default `model_loss`);
    `figures(logger, step, module, batch, out)` draws PNGs every logging.plot_every steps.
    The model must have been initialised the same way on every rank (seed first).
    """

    def __init__(self, recipe, model: torch.nn.Module, stream, *, dist: Dist, run_dir: Path, steps: int,
                 seed: int, loss_fn=model_loss, param_groups: list[dict] | None = None, figures=None,
                 flops_per_clip: float | None = None, name: str = "pretrain") -> None:
        self.recipe, self.stream, self.dist, self.run_dir = recipe, stream, dist, Path(run_dir)
        self.tc, self.steps, self.loss_fn, self.figures, self.name = recipe.train, steps, loss_fn, figures, name
        self.heartbeat = _start_heartbeat(self.tc, self.run_dir, dist.rank, dist.world)
        if dist.device.type == "cpu":
            torch.set_num_threads(cpu_threads(self.tc, recipe.data))
        if self.tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.engine, _, self.schedule = build_engine(model, recipe, world_size=dist.world, total_steps=steps,
                                                     param_groups=param_groups)
        # Compiled regions: the steps up to the first compiled backward fall back to eager on failure.
        self.compile_guard = C.is_compiled(self.engine.module)
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
        self.drops = _Drops(stream, dist.rank)
        self.losses: list[float] = []
        self.collapse_warned = False

    # -- init / resume ----------------------------------------------------------------

    def resume(self, start: Path | None) -> None:
        """Continue from checkpoint `start` (None: a fresh run): model, optimizer, step
        counters, the stream's epoch and position (the same next batch) and every RNG (the
        same masks). The lr needs nothing: it is a function of the step."""
        if start is None:
            return
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
        """Notes for the settings a resume may change (the stream adds its own); UserError
        naming the setting for those DeepSpeed cannot load into."""
        ds = (meta.get("recipe") or {}).get("deepspeed") or {}
        cur, world, saved_world = self.recipe.deepspeed, self.dist.world, int(meta["world_size"])
        stage = ds.get("zero_stage", cur.zero_stage)
        if stage != cur.zero_stage:
            raise UserError(f"{start}: saved with deepspeed.zero_stage={stage}, this run has {cur.zero_stage}; "
                            "DeepSpeed cannot load one ZeRO stage's checkpoint into another: resume with "
                            f"--set deepspeed.zero_stage={stage}")
        if saved_world != world and stage > 0:
            raise UserError(f"{start}: saved by {saved_world} ranks with deepspeed.zero_stage={stage}, whose "
                            f"optimizer state is split {saved_world} ways; DeepSpeed cannot re-split it for "
                            f"{world} rank(s): resume on {saved_world} ranks (an elastic resume needs "
                            "deepspeed.zero_stage=0)")
        notes = []
        accum = ds.get("grad_accum", cur.grad_accum)
        if accum != cur.grad_accum:
            notes.append(f"deepspeed.grad_accum {accum} -> {cur.grad_accum}")
        saved_batch = (meta.get("recipe") or {}).get("data", {}).get("batch_size", self.recipe.data.batch_size)
        before, now = saved_batch * accum * saved_world, self.recipe.data.batch_size * cur.grad_accum * world
        if before != now:
            notes.append(f"global batch {before} -> {now} clips per step (the peak lr scales with it)")
        return notes

    # -- the loop ---------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until step `steps` (or a stop request: save and return); returns the summary."""
        self.engine.train()
        self._open()
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
            raise _collective_error(e, self.tc) or e
        finally:
            self._close()
        return self.summary()

    def train_step(self) -> _Step:
        """One optimizer step: micro-batches (`micro_step`) until `grad_accum` of them had a
        finite loss on every rank. Each micro-batch costs one host read."""
        t0 = time.perf_counter()
        s = _Step(lr=self.schedule.apply(self.engine.optimizer, self.step))  # a function of the step
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
        read, out = C.first_step_or_eager(step, self.engine.module)
        self.compile_guard = not read.finite  # until one compiled backward and step have run
        return read, out

    def _before_step(self) -> None:
        if self.own_norm and self.engine.is_gradient_accumulation_boundary() and self._logs(self.step + 1):
            self.grad_norm = _grad_norm(self.engine.module)  # a tensor: read when logged

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

    def log(self, s: _Step) -> None:
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

    def _phase_health(self, s: _Step) -> dict:
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

    def _open(self) -> None:
        """Metrics logger, the run's recipe.yaml, SIGTERM / SIGINT handlers, clocks."""
        d = self.dist
        self.logger = MetricsLogger(self.recipe.logging, self.run_dir, total_steps=self.steps,
                                    start_step=self.step, enabled=d.rank == 0, desc=self.name,
                                    config=to_dict(self.recipe))
        if d.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_yaml(self.recipe))
            start = f"resumed from {self.resumed_from}" if self.resumed_from else "fresh run"
            self.logger.message(f"[echofm] {start}: step {self.step}/{self.steps}, {d.world} rank(s) on "
                                f"{d.device.type}, run folder {self.run_dir}")
            if self.resume_notes:
                self.logger.message(f"[echofm] note: resumed with {', '.join(self.resume_notes)}; the epoch goes "
                                    "on from the clips all ranks had read, each sample once")
        # SIGTERM (schedulers, torchrun) and SIGINT: finish the step, checkpoint, return.
        # A second Ctrl-C interrupts at once.
        self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._it = iter(self.stream)
        if d.device.type == "cuda":  # memory_gib: the peak since the last log line, this run's only
            torch.cuda.reset_peak_memory_stats(d.device)
        self.t_run = time.perf_counter()
        self.interval = _Interval(decoded0=self.stream.stats["decoded_frames"])

    def _on_signal(self, signum, _frame) -> None:
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signalled = True

    def _close(self) -> None:
        for s, h in self._handlers.items():
            signal.signal(s, h)
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
                      flops_per_clip=model_flops(recipe.model, recipe.mask, recipe.loss)["train_step"])
    trainer.resume(start)
    return trainer.fit()


# ---------------------------------------------------------------- step bookkeeping


@dataclass(kw_only=True, slots=True)
class _Step:
    """One optimizer step: its lr, times, clips (delivered; trained: of finite micro-batches)
    and loss sums (rank sums) over finite micro-batches."""

    lr: float
    time: float = 0.0
    wait: float = 0.0
    clips: int = 0
    trained: int = 0
    n: int = 0
    loss: float = 0.0
    terms: dict = field(default_factory=dict)
    batch: dict | None = None
    out: dict | None = None

    def add(self, read: MicroRead, clips: int) -> None:
        self.n += 1
        self.trained += clips
        self.loss += read.loss
        for k, v in read.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v


@dataclass(kw_only=True, slots=True)
class _Interval:
    """Sums since the last log line (this rank's times and clips; losses already summed
    over ranks), plus run totals."""

    steps: int = 0
    time: float = 0.0
    wait: float = 0.0
    clips: int = 0
    trained: int = 0
    loss: float = 0.0
    terms: dict = field(default_factory=dict)
    decoded0: int = 0
    total_time: float = 0.0
    total_wait: float = 0.0
    total_clips: int = 0

    def add(self, s: _Step) -> None:
        self.steps += 1
        self.time += s.time
        self.wait += s.wait
        self.clips += s.clips
        self.trained += s.trained
        self.loss += s.loss / s.n
        for k, v in s.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v / s.n
        self.total_time += s.time
        self.total_wait += s.wait
        self.total_clips += s.clips

    def summary(self, decoded: int, frames: int, device: torch.device, world: int, *,
                flops_per_clip: float | None = None, peak: float | None = None) -> dict:
        """Interval metrics: clips and frames summed over ranks, losses and times averaged; MFU
        (flops.mfu, docs/mfu.md) from the clips that completed a training step, all ranks together,
        over `world` devices of `peak` FLOP/s (None without both)."""
        vals = _all_sum([self.time, self.wait, float(self.clips), float(self.trained), float(decoded - self.decoded0)],
                        device, world)
        t, wait, clips, trained, dec = vals[0] / world, vals[1] / world, vals[2], vals[3], vals[4]
        n = max(self.steps, 1)
        return {"loss": self.loss / world / n,
                **{f"loss_{k}": self.terms[k] / world / n for k in sorted(self.terms)},
                "step_time_s": t / n, "data_wait_s": wait / n, "compute_s": (t - wait) / n,
                "data_wait_fraction": wait / t if t else None,
                "clips_per_s": clips / t if t else None,
                "sampled_fps": clips * frames / t if t else None,
                "decoded_fps": dec / t if t else None,
                # frames the decoder produced per frame the model got (loaders/fold.py: ~1.1 folded)
                "decode_waste": dec / (clips * frames) if clips else None,
                "mfu": mfu(flops_per_clip, trained / t, peak, world) if flops_per_clip and peak and t else None}

    def reset(self, decoded: int) -> None:
        self.steps, self.time, self.wait, self.clips, self.trained, self.loss = 0, 0.0, 0.0, 0, 0, 0.0
        self.terms = {}
        self.decoded0 = decoded


class _Drops:
    """Damaged samples the stream skipped (data.on_error=skip): each rank prints its own as
    they are found; every micro-batch's host read sums the counts over ranks, and all ranks
    stop together beyond data.max_dropped."""

    def __init__(self, stream, rank: int) -> None:
        self.stream, self.rank = stream, rank
        self.announced = set(stream.damaged)
        self.counts = {"dropped_total": 0, "damaged_samples": 0}

    def announce(self, log) -> None:
        damaged = self.stream.damaged
        for key in [k for k in damaged if k not in self.announced]:
            line = f"[echofm] rank {self.rank}: skipped damaged sample: {damaged[key]}"
            log.message(line) if self.rank == 0 else print(line, flush=True)
            self.announced.add(key)

    def local(self) -> list[float]:
        """This rank's [damaged samples, dropped reads]."""
        return [float(len(self.stream.damaged)), float(self.stream.stats["skipped"])]

    def update(self, *, damaged: int, dropped: int) -> None:
        """The counts summed over ranks; DataError beyond data.max_dropped."""
        self.counts = {"dropped_total": dropped, "damaged_samples": damaged}
        self.stream.check_dropped(damaged)

    def summary_line(self) -> str:
        c = self.counts
        return (f"[echofm] data.on_error=skip: {c['damaged_samples']} damaged sample(s) skipped "
                f"({c['dropped_total']} reads dropped); `echofm shards verify` names them all")


def _grad_norm(module: torch.nn.Module) -> torch.Tensor | float:
    """Global L2 norm of the gradients (before clipping), left on the device."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else 0.0


def plot_reconstruction(log, step: int, model, batch: dict, out: dict) -> None:
    """Input / masked / reconstructed frames of clip 0 and its S / P matrices."""
    rows = reconstruction_rows(model, batch["video"][:1], out)
    sim, prior = out.get("sim"), out.get("prior")
    log.figures(step, rows, sim[0].detach().float().cpu().numpy() if sim is not None else None,
                prior[0].detach().float().cpu().numpy() if prior is not None else None,
                note=phase_health.figure_note(phase_health.from_output(out)))


# ---------------------------------------------------------------- failure handling helpers


def resume_point(resume: str | None, run_dir: Path, *, folder_key: str = "train.out_dir") -> Path | None:
    """The checkpoint to continue from (hashed: damaged ones are skipped with a message when
    searching a folder, an error when named directly), or None for a fresh run (refused
    where `run_dir` has checkpoints; `folder_key` names the recipe key that places it)."""
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
                        f"pick another {folder_key} or name")
    return None


def _start_heartbeat(tc: TrainConfig, run_dir: Path, rank: int, world: int) -> Heartbeat | None:
    """Several ranks: beat and watch (heartbeat.py); None for a lone process."""
    if world == 1:
        return None

    def hint() -> str:
        last = ckpt.complete_checkpoints(run_dir / "checkpoints")
        return f"last complete checkpoint: {last[-1] if last else 'none'} (continue with --resume auto)"

    return Heartbeat(run_dir / "heartbeat", rank=rank, world_size=world, timeout_s=tc.heartbeat_timeout_s,
                     hint=hint).start()


def _collective_error(e: RuntimeError, tc: TrainConfig) -> UserError | None:
    """A process-group timeout as one line (the heartbeat usually names the rank first)."""
    def says_timeout(text: str) -> bool:
        return "timed out" in text.lower() or "timeout" in text.lower()

    text = str(e)
    if not says_timeout(text):
        return None
    first = next((ln.strip() for ln in text.splitlines() if says_timeout(ln)), text)
    return UserError(f"a collective did not complete within train.collective_timeout_s="
                     f"{tc.collective_timeout_s:g} s: another rank is stalled or died ({first[:200]})")
