"""Downstream task config (being built by the downstream issue; the contract for recipes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class DownstreamConfig:
    task: Literal["view", "ef", "grade", "seg"] = "view"
    mode: Literal["probe", "finetune"] = "probe"
    backbone: str = "random"
    label_fraction: float = 1.0
