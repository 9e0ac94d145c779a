"""Losses (being built by the model issue; the config is the recipe contract)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Reconstruction + periodic-driven contrastive (DESIGN §4)."""

    norm_pix: bool = True
    """Normalise each target patch by its own mean/std (MAE's norm-pix loss)."""
    contrastive_weight: float = 0.1
    """w_c in total = reconstruction + w_c * contrastive; 0 disables the term."""
    margin: float = 0.3
    """Triplet margin on cosine similarities."""
    kl_weight: float = 0.0
    """Optional KL(softmax(P) || softmax(S)) cycle term."""
    temperature: float = 0.1
    """Softmax temperature for the KL term."""
