"""Task heads: a video-level head on pooled features, a light decoder for segmentation.

Both carry their input normalisation as buffers, so a saved head is self-contained:
`evaluate` reloads it and gets the same outputs from the same features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VideoHead(nn.Module):
    """Standardise pooled features, then linear (probe) or a one-hidden-layer MLP.

    forward: feats float [B, F] -> float [B, out_dim] (logits or the regression value)."""

    def __init__(self, in_dim: int, out_dim: int, *, kind: str = "linear", hidden: int = 256):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        # Regression targets (EF in percent) are standardised too; identity for classifiers.
        self.register_buffer("out_mean", torch.zeros(out_dim))
        self.register_buffer("out_std", torch.ones(out_dim))
        # Regression outputs stay inside the training label range: with a few labelled
        # patients a linear head extrapolates far outside it (EF 150 %).
        self.register_buffer("out_lo", torch.full((out_dim,), -torch.inf))
        self.register_buffer("out_hi", torch.full((out_dim,), torch.inf))
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"unknown head kind {kind!r} (linear, mlp)")

    def set_input_stats(self, feats: torch.Tensor) -> None:
        """Fit the standardisation on training features [N, F] (float). The std has a floor
        of a tenth of the median std: with a handful of training clips (1% labels) a
        nearly constant feature would otherwise blow up on test clips."""
        std = feats.std(0, unbiased=False)
        self.mean.copy_(feats.mean(0))
        self.std.copy_(std.clamp_min(max(0.1 * float(std.median()), 1e-6)))

    def set_output_stats(self, y: torch.Tensor) -> None:
        """Regression: predict standardised targets y [N, out]; forward undoes it and
        clamps to the range of y."""
        self.out_mean.copy_(y.mean(0))
        self.out_std.copy_(y.std(0, unbiased=False).clamp_min(1e-6))
        self.out_lo.copy_(y.min(0).values)
        self.out_hi.copy_(y.max(0).values)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.raw(feats) * self.out_std + self.out_mean, self.out_lo, self.out_hi)

    def raw(self, feats: torch.Tensor) -> torch.Tensor:
        """Output in standardised target units (what the loss sees)."""
        return self.net((feats.float() - self.mean) / self.std)


class SegDecoder(nn.Module):
    """Light decoder: token grid -> per-frame class logits at the frame size.

    Per time slice: LayerNorm, a 1x1 projection, two (conv3x3 + GELU + 2x upsample)
    stages, a 1x1 classifier, then bilinear upsampling to the frame. Each token slice
    covers `tubelet` frames, so its map is repeated for them.

    forward: tokens float [B, T', h, w, D] -> logits float [B, K, T' * tubelet, H, W]."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 128, tubelet: int = 2,
                 frame_size: int = 112):
        super().__init__()
        self.tubelet, self.frame_size = tubelet, frame_size
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, hidden)
        half = max(hidden // 2, 8)
        self.up1 = nn.Conv2d(hidden, half, 3, padding=1)
        self.up2 = nn.Conv2d(half, half, 3, padding=1)
        self.cls = nn.Conv2d(half, num_classes, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t, h, w, _ = tokens.shape
        x = self.proj(self.norm(tokens.float()))                    # [B, T', h, w, hid]
        x = x.reshape(b * t, h, w, -1).permute(0, 3, 1, 2)          # [B*T', hid, h, w]
        x = F.interpolate(F.gelu(self.up1(x)), scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(F.gelu(self.up2(x)), scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(self.cls(x), size=(self.frame_size, self.frame_size), mode="bilinear",
                          align_corners=False)                      # [B*T', K, H, W]
        x = x.reshape(b, t, *x.shape[1:]).repeat_interleave(self.tubelet, dim=1)
        return x.permute(0, 2, 1, 3, 4)                             # [B, K, T, H, W]
