"""Metrics logging (being built by the trainer issue; the config is the contract)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    plot_every: int = 0
    progress: bool = True
