"""One micro-batch of training: forward and loss, the one host read, backward and step.

`micro_step` is the trainer's work on a micro-batch (MAE's train_one_epoch body) and what
benchmarks/train.py times; `host_read` is its single device-to-host transfer, summed over
ranks, so that every rank agrees to skip a non-finite loss before the collective backward.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .compile import step_begin

__all__ = ["MicroRead", "host_read", "micro_step", "model_loss"]


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
    step_begin(engine.module)  # a new iteration for CUDA-graph modes
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
