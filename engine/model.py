"""EchoFM video MAE (being built by the model issue; the config is the recipe contract)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture. `preset` fills every field left at None (DESIGN §5)."""

    preset: Literal["echofm_vit_large", "echofm_vit_base", "echofm_tiny"] = "echofm_tiny"
    num_frames: int | None = None
    img_size: int | None = None
    patch_size: int | None = None
    tubelet: int | None = None
    in_chans: int = 3
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    pred_t_dim: int | None = None
    """Frames the decoder reconstructs (the paper predicts 8 of 32)."""
    attention: Literal["joint", "divided"] = "joint"
    """Encoder attention: joint over all tokens, or divided (slice then tube)."""
    attn_backend: Literal["auto", "triton", "sdpa", "xformers", "math"] = "auto"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
