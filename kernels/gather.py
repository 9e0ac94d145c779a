"""Triton masking gather / scatter (tokens and raw video patches) and their autograd Functions.

Every kernel writes each element of its output exactly once (no zero-fill pass first):
scatters run over the *output* rows and look up where each row comes from in `pos`, the
inverse of `ids` (pos[b, j] = k if ids[b, k] == j else -1). That also makes the backward of
a gather a plain scatter, which is why ids must be unique within a row.

The `*_fwd` / `*_bwd` functions take an optional `out=` so tests can pass NaN-poisoned
buffers and catch any element a kernel forgets to write.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .reference import device_norm


def _blocks(width: int, budget: int = 4096) -> tuple[int, int]:
    """(rows, cols) of a 2-D tile of about `budget` elements.

    cols: a power-of-2 divisor of the row width when there is one >= 128 (768 -> 256,
    1536 -> 512: no masked-off lanes), else the row width rounded up; at most 1024.
    """
    divisor = width & -width
    cols = min(divisor if divisor >= 128 else triton.next_power_of_2(width), 1024)
    return max(1, budget // cols), cols


def inverse_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids int64 [B, K] (unique per row) -> pos int32 [B, n]: index into ids, or -1."""
    b, k = ids.shape
    pos = torch.full((b, n), -1, dtype=torch.int32, device=ids.device)
    src = torch.arange(k, dtype=torch.int32, device=ids.device).expand(b, k)
    return pos.scatter_(1, ids, src)


# ---- token rows: gather and scatter --------------------------------------------------------


@triton.jit
def _tile(rows, per_sample, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # The index setup of every kernel here: this program's tile is BLOCK_R of the `rows` rows
    # (b, i) of a [B, per_sample] row grid (axis 0) x BLOCK_C columns (axis 1).
    # -> b int64 [R], i [R], row mask [R], columns [C].
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return (r // per_sample).to(tl.int64), r % per_sample, r < rows, cols


@triton.jit
def _gather_rows_kernel(x, ids, y, rows, K, D, sxb, sxn, sxd, sib, sik, syb, syk, syd,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One tile = BLOCK_R output rows (b, k) x BLOCK_D features: y[b, k] = x[b, ids[b, k]].
    b, k, rmask, d = _tile(rows, K, BLOCK_R, BLOCK_D)
    src_row = tl.load(ids + b * sib + k * sik, mask=rmask, other=0)
    m = rmask[:, None] & (d < D)[None, :]
    val = tl.load(x + (b * sxb + src_row * sxn)[:, None] + d[None, :] * sxd, mask=m)
    tl.store(y + (b * syb + k * syk)[:, None] + d[None, :] * syd, val, mask=m)


@triton.jit
def _scatter_rows_kernel(y, pos, fill, out, rows, n, D, syb, syk, syd, sfb, sfn, sfd, sob, son, sod,
                         FILL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One tile = BLOCK_R output rows (b, j): out[b, j] = y[b, pos[b, j]] if pos >= 0 else fill.
    # FILL: 0 zeros, 1 one [D] vector (mask token), 2 a full [B, n, D] tensor.
    b, j, rmask, d = _tile(rows, n, BLOCK_R, BLOCK_D)
    p = tl.load(pos + b * n + j, mask=rmask, other=-1)
    m = rmask[:, None] & (d < D)[None, :]
    hit = m & (p >= 0)[:, None]
    val = tl.load(y + (b * syb + p * syk)[:, None] + d[None, :] * syd, mask=hit, other=0)
    if FILL == 1:
        f = tl.load(fill + d * sfd, mask=d < D, other=0).to(val.dtype)
        val = tl.where(hit, val, f[None, :])
    elif FILL == 2:
        f = tl.load(fill + (b * sfb + j * sfn)[:, None] + d[None, :] * sfd, mask=m, other=0)
        val = tl.where(hit, val, f.to(val.dtype))
    tl.store(out + (b * sob + j * son)[:, None] + d[None, :] * sod, val, mask=m)


def gather_rows(x: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, D], ids int [B, K] -> out [B, K, D] (any strides for x, ids and out)."""
    b, k = ids.shape
    d = x.shape[-1]
    out = torch.empty((b, k, d), dtype=x.dtype, device=x.device) if out is None else out
    br, bd = _blocks(d)
    grid = (triton.cdiv(b * k, br), triton.cdiv(d, bd))
    _gather_rows_kernel[grid](x, ids, out, b * k, k, d, *x.stride(), *ids.stride(), *out.stride(),
                              BLOCK_R=br, BLOCK_D=bd)
    return out


def scatter_rows(y: torch.Tensor, pos: torch.Tensor, fill: torch.Tensor | None, n: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, K, D], pos int32 [B, n] (from `inverse_ids`), fill None (zeros) | [D] | [B, n, D]
    -> out [B, n, D] in y's dtype."""
    b, _, d = y.shape
    out = torch.empty((b, n, d), dtype=y.dtype, device=y.device) if out is None else out
    mode = 0 if fill is None else (1 if fill.dim() == 1 else 2)
    fill_t = y if fill is None else fill  # a valid pointer; never read when mode == 0
    fs = (0, 0, fill_t.stride(0)) if mode == 1 else ((0, 0, 0) if mode == 0 else fill_t.stride())
    br, bd = _blocks(d)
    grid = (triton.cdiv(b * n, br), triton.cdiv(d, bd))
    _scatter_rows_kernel[grid](y, pos.contiguous(), fill_t, out, b * n, n, d, *y.stride(), *fs, *out.stride(),
                               FILL=mode, BLOCK_R=br, BLOCK_D=bd)
    return out


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids):
        ctx.save_for_backward(ids)
        ctx.n = x.shape[1]
        return gather_rows(x, ids)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        return scatter_rows(dy, inverse_ids(ids, ctx.n), None, ctx.n), None


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, ids, fill, n):
        pos = inverse_ids(ids, n)
        ctx.save_for_backward(ids, pos)
        ctx.fill_shape, ctx.fill_dtype = fill.shape, fill.dtype
        return scatter_rows(y, pos, fill, n)

    @staticmethod
    def backward(ctx, dout):
        ids, pos = ctx.saved_tensors
        dy = gather_rows(dout, ids) if ctx.needs_input_grad[0] else None
        dfill = None
        if ctx.needs_input_grad[2]:
            # The fill gradient is the output gradient at the masked rows; for a [D] mask token
            # that is a sum over them (fp32: thousands of rows).
            masked = dout.masked_fill((pos >= 0)[..., None], 0)
            dfill = masked if len(ctx.fill_shape) == 3 else masked.sum((0, 1), dtype=torch.float32)
            dfill = dfill.to(ctx.fill_dtype)
        return dy, None, dfill, None


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids int64 [B, K] (unique per row) -> [B, K, D]; differentiable in x."""
    return _GatherTokens.apply(x, ids)


def scatter_tokens(y: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor, n: int) -> torch.Tensor:
    """y [B, K, D] at ids [B, K] of [B, n, D], fill elsewhere; differentiable in y and fill.

    fill: one [D] vector (also given as [1, 1, D], the usual mask-token parameter) or a
    tensor broadcastable to [B, n, D]; autograd sums the gradient back to fill's shape.
    """
    b, _, d = y.shape
    fill = fill.reshape(d) if fill.numel() == d else fill.expand(b, n, d)
    return _ScatterTokens.apply(y, ids, fill, n)


# ---- video patches -------------------------------------------------------------------------


@triton.jit
def _patch_offsets(b, patch, e, Hp, Wp, svb, svt, svh, svw, svc,
                   PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    # Video offset of element e (flattened (C, t, p, p), Conv3d order) of grid patch `patch`
    # ((t, h, w) row-major over the [T/PT, H/PH, W/PW] grid) in sample b. [R] x [E] -> [R, E].
    gt = patch // (Hp * Wp)
    gh = (patch // Wp) % Hp
    gw = patch % Wp
    c = e // (PT * PH * PW)
    dt = (e // (PH * PW)) % PT
    dy = (e // PW) % PH
    dx = e % PW
    row = b * svb + (gt * PT) * svt + (gh * PH) * svh + (gw * PW) * svw
    return row[:, None] + (dt * svt + dy * svh + dx * svw + c * svc)[None, :], c


@triton.jit
def _patches_fwd_kernel(video, ids, scale, shift, out, rows, K, P, Hp, Wp,
                        svb, svt, svh, svw, svc, sib, sik, sob, sok, soe,
                        PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NORM: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    # out[b, k, e] = norm(video at element e of patch ids[b, k]); norm = x * scale[c] + shift[c].
    b, k, rmask, e = _tile(rows, K, BLOCK_R, BLOCK_E)
    patch = tl.load(ids + b * sib + k * sik, mask=rmask, other=0)
    src, c = _patch_offsets(b, patch, e, Hp, Wp, svb, svt, svh, svw, svc, PT, PH, PW)
    m = rmask[:, None] & (e < P)[None, :]
    x = tl.load(video + src, mask=m, other=0).to(tl.float32)
    if NORM:
        x = x * tl.load(scale + c, mask=e < P, other=1)[None, :] + tl.load(shift + c, mask=e < P, other=0)[None, :]
    tl.store(out + (b * sob + k * sok)[:, None] + e[None, :] * soe, x.to(out.dtype.element_ty), mask=m)


@triton.jit
def _patches_bwd_kernel(dp, pos, scale, dvideo, rows, L, P, Hp, Wp,
                        sdb, sdk, sde, svb, svt, svh, svw, svc,
                        PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NORM: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    # Over ALL L grid patches of each sample, so every video element is written once:
    # dvideo = dp[b, pos] * scale[c] for visible patches (pos >= 0), else 0.
    b, patch, rmask, e = _tile(rows, L, BLOCK_R, BLOCK_E)
    p = tl.load(pos + b * L + patch, mask=rmask, other=-1)
    dst, c = _patch_offsets(b, patch, e, Hp, Wp, svb, svt, svh, svw, svc, PT, PH, PW)
    m = rmask[:, None] & (e < P)[None, :]
    g = tl.load(dp + (b * sdb + p * sdk)[:, None] + e[None, :] * sde, mask=m & (p >= 0)[:, None], other=0)
    g = g.to(tl.float32)
    if NORM:
        g = g * tl.load(scale + c, mask=e < P, other=1)[None, :]
    tl.store(dvideo + dst, g.to(dvideo.dtype.element_ty), mask=m)


def _grid_shape(video_shape: Sequence[int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    _, t, h, w, _ = video_shape
    if t % patch[0] or h % patch[1] or w % patch[2]:
        raise ValueError(f"gather_patches: video {tuple(video_shape)} is not divisible by patch {patch}")
    return t // patch[0], h // patch[1], w // patch[2]


def patches_fwd(video: torch.Tensor, ids: torch.Tensor, patch: tuple[int, int, int],
                norm: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """video [B, T, H, W, C], ids [B, K], norm = fp32 (scale [C], shift [C]) or None
    -> out [B, K, C*t*p*p] (float32 for uint8 video, else the video's dtype)."""
    _, hp, wp = _grid_shape(video.shape, patch)
    b, k = ids.shape
    p = video.shape[-1] * patch[0] * patch[1] * patch[2]
    dtype = torch.float32 if video.dtype == torch.uint8 else video.dtype
    out = torch.empty((b, k, p), dtype=dtype, device=video.device) if out is None else out
    scale, shift = norm if norm is not None else (out, out)  # valid pointers, unread without NORM
    br, be = _blocks(p)
    grid = (triton.cdiv(b * k, br), triton.cdiv(p, be))
    _patches_fwd_kernel[grid](video, ids, scale, shift, out, b * k, k, p, hp, wp, *video.stride(), *ids.stride(),
                              *out.stride(), PT=patch[0], PH=patch[1], PW=patch[2], NORM=norm is not None,
                              BLOCK_R=br, BLOCK_E=be)
    return out


def patches_bwd(dp: torch.Tensor, pos: torch.Tensor, video_shape: Sequence[int], patch: tuple[int, int, int],
                scale: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """dp [B, K, C*t*p*p], pos int32 [B, L] -> dvideo [B, T, H, W, C] of `dtype` (0 off the visible patches)."""
    gt, hp, wp = _grid_shape(video_shape, patch)
    b, big_l, p = video_shape[0], gt * hp * wp, dp.shape[-1]
    out = torch.empty(tuple(video_shape), dtype=dtype, device=dp.device) if out is None else out
    br, be = _blocks(p)
    grid = (triton.cdiv(b * big_l, br), triton.cdiv(p, be))
    _patches_bwd_kernel[grid](dp, pos.contiguous(), dp if scale is None else scale, out, b * big_l, big_l, p, hp, wp,
                              *dp.stride(), *out.stride(), PT=patch[0], PH=patch[1], PW=patch[2],
                              NORM=scale is not None, BLOCK_R=br, BLOCK_E=be)
    return out


class _GatherPatches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, video, ids, patch, norm):
        ctx.save_for_backward(ids)
        ctx.meta = (video.shape, video.dtype, patch, None if norm is None else norm[0])
        return patches_fwd(video, ids, patch, norm)

    @staticmethod
    def backward(ctx, dp):
        (ids,) = ctx.saved_tensors
        shape, dtype, patch, scale = ctx.meta
        grid = _grid_shape(shape, patch)
        pos = inverse_ids(ids, grid[0] * grid[1] * grid[2])
        return patches_bwd(dp, pos, shape, patch, scale, dtype), None, None, None


def gather_patches(video: torch.Tensor, ids: torch.Tensor, patch: tuple[int, int, int],
                   mean: Sequence[float] | torch.Tensor | None = None,
                   std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `echofm.kernels.gather_patches` (same arguments and result)."""
    norm = device_norm(video.shape[-1], video.dtype == torch.uint8, mean, std, video.device, torch.float32)
    return _GatherPatches.apply(video, ids, tuple(patch), norm)
