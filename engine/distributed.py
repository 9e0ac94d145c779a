"""Where a run's processes meet and what DeepSpeed builds for each of them.

`init_distributed` joins (or, for a lone process, creates) the process group and returns this
process's `Dist`; `build_engine` prepares the model for the recipe's step (`prepare_model`:
device, activation checkpointing, torch.compile) and wraps it in a DeepSpeed engine with the
client AdamW and the lr schedule. The heartbeat between ranks (heartbeat.py) and the one-line
reading of a process-group timeout live here too; engine/trainer.py runs the loop on top.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from . import checkpoint as ckpt
from .compile import GRAPH_MODES, compile_for_training
from .errors import UserError
from .heartbeat import Heartbeat
from .optim import LrSchedule, build_optimizer, peak_lr
from .optim import param_groups as default_groups

__all__ = ["DeepSpeedConfig", "Dist", "build_engine", "collective_error", "cpu_threads", "deepspeed_config",
           "init_distributed", "prepare_model", "start_heartbeat", "step_device"]


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
    if recipe.train.compile.enabled and mode in GRAPH_MODES and recipe.deepspeed.grad_accum > 1:
        raise UserError(f"train.compile.mode={mode!r} (CUDA graphs) needs deepspeed.grad_accum=1, got "
                        f"{recipe.deepspeed.grad_accum}: a replay reuses the memory of the last one's "
                        "gradients, which accumulation still holds; use mode 'default'")
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(recipe.deepspeed.activation_checkpointing)
    model = model.to(device)
    return compile_for_training(model, recipe.train.compile, device)


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


def cpu_threads(tc, data) -> int:
    """torch threads for one CPU process (see TrainConfig.cpu_threads)."""
    if tc.cpu_threads is not None:
        return tc.cpu_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or launcher's) choice
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, cores // local - data.num_threads)


def start_heartbeat(tc, run_dir: Path, rank: int, world: int) -> Heartbeat | None:
    """Several ranks: beat and watch (heartbeat.py); None for a lone process."""
    if world == 1:
        return None

    def hint() -> str:
        last = ckpt.complete_checkpoints(run_dir / "checkpoints")
        return f"last complete checkpoint: {last[-1] if last else 'none'} (continue with --resume auto)"

    return Heartbeat(run_dir / "heartbeat", rank=rank, world_size=world, timeout_s=tc.heartbeat_timeout_s,
                     hint=hint).start()


def collective_error(e: RuntimeError, tc) -> UserError | None:
    """A process-group timeout as one line (the heartbeat usually names the rank first)."""
    def says_timeout(text: str) -> bool:
        return "timed out" in text.lower() or "timeout" in text.lower()

    text = str(e)
    if not says_timeout(text):
        return None
    first = next((ln.strip() for ln in text.splitlines() if says_timeout(ln)), text)
    return UserError(f"a collective did not complete within train.collective_timeout_s="
                     f"{tc.collective_timeout_s:g} s: another rank is stalled or died ({first[:200]})")
