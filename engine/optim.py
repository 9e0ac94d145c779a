"""Optimiser and lr schedule (being built by the trainer issue; configs are the contract)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW as in the paper era (DESIGN §5)."""

    base_lr: float = 1.0e-3
    """lr = base_lr * global_batch / 256."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 1.0


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Linear warmup, then half-cycle cosine to min_lr."""

    warmup_steps: int = 10
    min_lr: float = 0.0
