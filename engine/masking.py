"""Token masking: which patches of a clip the encoder sees (docs/fidelity.md).

The token grid of a clip is (T', L): T' = num_frames / tubelet temporal slices, L = h * w
spatial patches, flattened as n = t * L + s (the (t, h, w) order of `gather_patches`).

- `tube` (the paper's spatio-temporally consistent mask): one random spatial set of
  K = int(L * (1 - r)) positions per clip, kept at every slice, so the visible tokens
  are K complete tubes of length T'. `ids_keep` is ordered (t, k): the visible tokens
  reshape to [B, T', K, D] without a copy, the layout `tube_attention` works on.
- `random`: per-token (MAE / VideoMAE "random"): int(N * (1 - r)) tokens anywhere.
- `frame`: whole temporal slices: int(T' * (1 - r)) slices kept, all L positions.

Kept counts use the official code's expression `int(L * (1 - r))` (truncation in float
arithmetic), not round(): ViT-B at r = 0.9 with L = 196 keeps 19 positions (round: 20),
and L = 100 at r = 0.9 keeps 9 (1 - 0.9 is 0.0999... in binary). A departure from
the usual round() for bit-for-bit parity with official checkpoints; at
least one is always kept (the official code would build an empty encoder input).

Everything is drawn on the tensors' device with torch ops (argsort of uniform noise, an
optional `torch.Generator`): no host sync, no Python loop over the batch.

Unlike the official EchoFM 2024 code, `ids_restore` is the true inverse of the full
permutation `ids_shuffle = [ids_keep, ids_masked]`, and every visible token keeps its own
(t, s) position (the official code gave every visible token the temporal position t=0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True, slots=True)
class MaskConfig:
    """Which tokens the encoder sees (docs/fidelity.md)."""

    kind: Literal["tube", "random", "frame"] = "tube"
    """tube: one spatial mask shared by every temporal slice (the paper's); random: per
    token; frame: whole temporal slices."""
    ratio: float = 0.75
    """Fraction of tokens removed (0 = everything visible)."""

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")


@dataclass(kw_only=True, slots=True)
class Mask:
    """One batch's mask over the (T', L) token grid; all tensors on the clip's device."""

    ids_keep: torch.Tensor
    """int64 [B, Nv]: visible token indices n = t * L + s, ordered (t, s) ascending."""
    ids_restore: torch.Tensor
    """int64 [B, N]: inverse of ids_shuffle = [ids_keep, masked ids]; ids_shuffle[ids_restore] = arange."""
    mask: torch.Tensor
    """float32 [B, N]: 1 where the token is removed, 0 where visible (MAE convention)."""
    grid: tuple[int, int] | None
    """(T', K) when the visible tokens form complete tubes ([B, T', K, D] layout), else None."""
    t_grid: int
    """T', temporal slices of the full grid."""
    l_grid: int
    """L, spatial patches per slice."""

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    def ids_masked(self) -> torch.Tensor:
        """int64 [B, N - Nv]: the removed tokens, ids_shuffle[:, Nv:] (ids_shuffle is the
        inverse permutation of ids_restore); every row removes the same number of tokens."""
        return torch.argsort(self.ids_restore, dim=1)[:, self.num_visible:]

    def slice_valid(self) -> torch.Tensor:
        """bool [B, T']: slices with at least one visible token."""
        vis = (1.0 - self.mask).view(-1, self.t_grid, self.l_grid)
        return vis.amax(-1) > 0


def _noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


def _finish(ids_keep: torch.Tensor, n: int, t_grid: int, l_grid: int, grid: tuple[int, int] | None) -> Mask:
    """Sorted ids_keep [B, Nv] -> full Mask (masked ids in ascending order after the kept ones)."""
    b = ids_keep.shape[0]
    device = ids_keep.device
    mask = torch.ones(b, n, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    # Stable sort of the 0/1 mask lists kept tokens first, each group in ascending order.
    ids_shuffle = torch.argsort(mask, dim=1, stable=True)
    ids_restore = torch.empty_like(ids_shuffle)
    ids_restore.scatter_(1, ids_shuffle, torch.arange(n, device=device).expand(b, n))
    return Mask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask, grid=grid,
                t_grid=t_grid, l_grid=l_grid)


def keep_count(l_grid: int, ratio: float) -> int:
    """K = int(L * (1 - ratio)) as the official code computes it, at least 1."""
    return max(1, min(l_grid, int(l_grid * (1 - ratio))))


def tube_mask(batch: int, t_grid: int, l_grid: int, ratio: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> Mask:
    """One spatial set of K positions per clip, shared by all T' slices."""
    device = torch.device(device)
    k = keep_count(l_grid, ratio)
    spatial = torch.argsort(_noise((batch, l_grid), device, generator), dim=1)[:, :k]
    spatial = spatial.sort(dim=1).values  # ascending: neighbouring patches stay close in memory
    offsets = torch.arange(t_grid, device=device).view(1, t_grid, 1) * l_grid
    ids_keep = (spatial.unsqueeze(1) + offsets).reshape(batch, t_grid * k)  # (t, k) order
    return _finish(ids_keep, t_grid * l_grid, t_grid, l_grid, (t_grid, k))


def random_mask(batch: int, t_grid: int, l_grid: int, ratio: float, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> Mask:
    """Per-token masking: int(N * (1 - ratio)) tokens kept anywhere in the grid."""
    device = torch.device(device)
    n = t_grid * l_grid
    nv = keep_count(n, ratio)
    ids_keep = torch.argsort(_noise((batch, n), device, generator), dim=1)[:, :nv].sort(dim=1).values
    return _finish(ids_keep, n, t_grid, l_grid, None)


def frame_mask(batch: int, t_grid: int, l_grid: int, ratio: float, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Mask:
    """Whole-slice masking: int(T' * (1 - ratio)) slices kept with all L positions."""
    device = torch.device(device)
    tk = keep_count(t_grid, ratio)
    slices = torch.argsort(_noise((batch, t_grid), device, generator), dim=1)[:, :tk].sort(dim=1).values
    spatial = torch.arange(l_grid, device=device).view(1, 1, l_grid)
    ids_keep = (slices.unsqueeze(-1) * l_grid + spatial).reshape(batch, tk * l_grid)
    return _finish(ids_keep, t_grid * l_grid, t_grid, l_grid, (tk, l_grid) if tk == t_grid else None)


def full_mask(batch: int, t_grid: int, l_grid: int, device: torch.device | str = "cpu") -> Mask:
    """Nothing removed (feature extraction): every token visible, grid (T', L)."""
    device = torch.device(device)
    n = t_grid * l_grid
    ids = torch.arange(n, device=device).expand(batch, n).contiguous()
    return Mask(ids_keep=ids, ids_restore=ids.clone(), mask=torch.zeros(batch, n, device=device),
                grid=(t_grid, l_grid), t_grid=t_grid, l_grid=l_grid)


def draw_mask(cfg: MaskConfig, batch: int, t_grid: int, l_grid: int, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> Mask:
    """The mask `cfg` asks for, drawn on `device` (no host sync)."""
    if cfg.ratio == 0.0:
        return full_mask(batch, t_grid, l_grid, device)
    fn = {"tube": tube_mask, "random": random_mask, "frame": frame_mask}[cfg.kind]
    return fn(batch, t_grid, l_grid, cfg.ratio, device, generator)
