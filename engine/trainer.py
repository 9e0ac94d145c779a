"""The DeepSpeed pretraining loop (being built by the trainer issue; configs are the contract)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    activation_checkpointing: bool = False


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    out_dir: str = "runs"
    steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    max_nonfinite: int = 5
