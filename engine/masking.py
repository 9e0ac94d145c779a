"""Token masking (being built by the model issue; the config is the recipe contract)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class MaskConfig:
    """Which tokens the encoder sees (DESIGN §4)."""

    kind: Literal["tube", "random", "frame"] = "tube"
    """tube: one spatial mask shared by every temporal slice (the paper's)."""
    ratio: float = 0.75

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
