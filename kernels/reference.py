"""Plain torch versions of the kernels: the `math` backend and the tests' oracle.

Every function here is differentiable through ordinary autograd and works on any device
and dtype (tests call them in float64). Shapes follow the public API (`echofm.kernels`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

MODES = ("joint", "slice", "tube")


class BackendUnavailable(RuntimeError):
    """A forced kernel backend that this machine cannot run (not installed, no GPU); the
    message says which and what to use instead (the CLI prints it as one line)."""

# Pinned SDPA backends: tube_attention backend name -> torch.nn.attention.SDPBackend member.
SDPA_PINNED = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
               "sdpa-efficient": "EFFICIENT_ATTENTION"}


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids int64 [B, K] -> x[b, ids[b, k]] as [B, K, D]."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(y: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor, n: int) -> torch.Tensor:
    """y [B, K, D] placed at rows `ids` [B, K] of a [B, n, D] tensor that is `fill` elsewhere.

    fill: [D] (e.g. the mask token) or [B, n, D]. ids must be unique per row.
    """
    base = fill.to(y.dtype).expand(y.shape[0], n, y.shape[-1])
    return base.scatter(1, ids[..., None].expand(-1, -1, y.shape[-1]), y)


def norm_params(
    c: int, uint8: bool, mean: Sequence[float] | torch.Tensor | None, std: Sequence[float] | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (scale, shift) in float64 on CPU so that normalised = x * scale + shift.

    uint8: (x/255 - mean)/std (mean 0, std 1 when not given); float: (x - mean)/std, or
    None (pass-through) when neither mean nor std is given.
    """
    if not uint8 and mean is None and std is None:
        return None
    m = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float64).flatten().cpu()
    s = torch.as_tensor(1.0 if std is None else std, dtype=torch.float64).flatten().cpu()
    m, s = m.expand(c) if m.numel() == 1 else m, s.expand(c) if s.numel() == 1 else s
    if m.numel() != c or s.numel() != c:
        raise ValueError(f"gather_patches: mean/std need 1 or C={c} values, got {m.numel()} and {s.numel()}")
    unit = 255.0 if uint8 else 1.0
    return 1.0 / (unit * s), -m / s


def device_norm(
    c: int, uint8: bool, mean: Sequence[float] | torch.Tensor | None, std: Sequence[float] | torch.Tensor | None,
    device: torch.device, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`norm_params` as (scale, shift) tensors of `dtype` on `device`.

    Sequences (the model's config tuples) are converted once per device and then reused:
    no host-to-device copy per call, which a CUDA graph capture would refuse.
    """
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
        params = norm_params(c, uint8, mean, std)
        return None if params is None else tuple(t.to(device, dtype) for t in params)
    key = (None if mean is None else tuple(map(float, mean)), None if std is None else tuple(map(float, std)))
    return _device_norm(c, uint8, *key, torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _device_norm(c, uint8, mean, std, device, dtype):
    params = norm_params(c, uint8, mean, std)
    return None if params is None else tuple(t.to(device, dtype) for t in params)


def patchify(video: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """video [B, T, H, W, C] -> all patches [B, L, C*t*p*p], L = (T/t)(H/p)(W/p) in (t, h, w)
    row-major order, each patch flattened in (C, t, p, p) order like a Conv3d weight."""
    b, t_, h_, w_, c = video.shape
    pt, ph, pw = patch
    if t_ % pt or h_ % ph or w_ % pw:
        raise ValueError(f"gather_patches: video {tuple(video.shape)} is not divisible by patch {patch}")
    x = video.reshape(b, t_ // pt, pt, h_ // ph, ph, w_ // pw, pw, c)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, T', H', W', C, t, p, p]
    return x.reshape(b, -1, c * pt * ph * pw)


def gather_patches(
    video: torch.Tensor,
    ids: torch.Tensor,
    patch: tuple[int, int, int],
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """video [B, T, H, W, C] uint8|float, ids [B, K] -> normalised patches [B, K, C*t*p*p]
    ((C, t, p, p) order; (t, p, p, C) with channels_last).

    uint8 gives float32; float keeps its dtype (and its gradient). The same numbers as
    `gather_tokens(patchify(normalised video), ids)`, but the K patches are picked from the
    raw clip first and only they are converted and normalised (at mask 0.75 a quarter of
    the clip; the elementwise arithmetic is the same, so the result is bit for bit equal).
    """
    b, t_, h_, w_, c = video.shape
    pt, ph, pw = patch
    if t_ % pt or h_ % ph or w_ % pw:
        raise ValueError(f"gather_patches: video {tuple(video.shape)} is not divisible by patch {patch}")
    hh, ww = h_ // ph, w_ // pw
    # [B, T', H', W', t, p, p, C]: a view; the pick copies whole (p, C) rows of the clip.
    grid = video.view(b, t_ // pt, pt, hh, ph, ww, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    ti, s = ids.div(hh * ww, rounding_mode="floor"), ids.remainder(hh * ww)
    rows = torch.arange(b, device=ids.device)[:, None]
    x = grid[rows, ti, s.div(ww, rounding_mode="floor"), s.remainder(ww)]  # [B, K, t, p, p, C]
    uint8 = video.dtype == torch.uint8
    params = device_norm(c, uint8, mean, std, x.device, torch.float32 if uint8 else x.dtype)
    if uint8:  # a fresh float32 tensor: normalised in place
        x = x.float()
        if params is not None:
            x.mul_(params[0]).add_(params[1])
    elif params is not None:
        x = x * params[0] + params[1]
    if not channels_last:
        x = x.permute(0, 1, 5, 2, 3, 4)  # (C, t, p, p): the Conv3d weight order
    return x.reshape(b, ids.shape[1], c * pt * ph * pw)


def _groups(x: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, H, T, K, Dh] -> [B, H, (G,) L, Dh] with attention inside the last-but-one dim."""
    if mode == "joint":
        return x.flatten(2, 3)
    if mode == "slice":
        return x
    if mode == "tube":
        return x.transpose(2, 3)
    raise ValueError(f"tube_attention: mode must be one of {MODES}, got {mode!r}")


def _ungroup(o: torch.Tensor, mode: str, shape: torch.Size) -> torch.Tensor:
    if mode == "joint":
        return o.reshape(shape)
    return o if mode == "slice" else o.transpose(2, 3)


def tube_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float | None = None
) -> torch.Tensor:
    """Explicit softmax attention. q, k, v [B, H, T, K, Dh] -> [B, H, T, K, Dh].

    Half inputs are computed in float32 and cast back; float32/64 stay in their dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg, kg, vg = (_groups(t, mode).to(work) for t in (q, k, v))
    s = (qg @ kg.transpose(-1, -2)) * scale
    o = torch.softmax(s, dim=-1) @ vg
    return _ungroup(o, mode, q.shape).to(q.dtype)


def _fold(x: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, H, T, K, Dh] -> [B, H*G, L, Dh]: groups folded into the head dim, the 4-D layout
    SDPA's fused kernels take (5-D inputs fall back to its math path). Copies where the
    strides do not allow a view (tube)."""
    g = _groups(x, mode)
    return g if mode == "joint" else g.flatten(1, 2)


def _unfold(o: torch.Tensor, mode: str, shape: torch.Size) -> torch.Tensor:
    b, h, t, k, dh = shape
    if mode == "joint":
        return o.reshape(shape)
    return o.reshape(b, h, t, k, dh) if mode == "slice" else o.reshape(b, h, k, t, dh).transpose(2, 3)


def tube_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float | None = None,
    pinned: str | None = None,
) -> torch.Tensor:
    """torch scaled_dot_product_attention over the folded groups ([B, H*G, L, Dh]).

    pinned: None lets torch pick its kernel; "sdpa-cudnn" | "sdpa-flash" | "sdpa-efficient"
    runs that one only (torch.nn.attention.sdpa_kernel) and raises a RuntimeError naming
    it when torch has no such kernel for these inputs.
    """
    qg, kg, vg = (_fold(t, mode) for t in (q, k, v))
    if pinned is None:
        return _unfold(F.scaled_dot_product_attention(qg, kg, vg, scale=scale), mode, q.shape)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([getattr(SDPBackend, SDPA_PINNED[pinned])]):
            o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
    except RuntimeError as e:
        if not any(m in str(e) for m in ("No available kernel", "No viable backend")):  # CUDA / CPU wording
            raise
        raise BackendUnavailable(f"tube_attention backend {pinned!r}: torch has no such SDPA kernel for "
                           f"{q.device.type} {q.dtype} Dh {q.shape[-1]} (use 'sdpa' or 'auto')") from e
    return _unfold(o, mode, q.shape)


def tube_attention_xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float | None = None
) -> torch.Tensor:
    """xformers memory_efficient_attention (CUDA only), imported on first use."""
    if not q.is_cuda:
        raise BackendUnavailable("tube_attention backend 'xformers' needs CUDA tensors (xformers has no CPU kernel); "
                           "use backend='sdpa' or 'math' on CPU")
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise BackendUnavailable("tube_attention backend 'xformers' needs `pip install xformers`") from e
    # xformers wants [batch, seq, heads, Dh]: fold the groups into the batch.
    qg, kg, vg = (_groups(t, mode) for t in (q, k, v))
    lead = qg.shape[:-2]

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-2], 1, t.shape[-1])

    o = xops.memory_efficient_attention(fold(qg), fold(kg), fold(vg), scale=scale)
    return _ungroup(o.reshape(*lead, *o.shape[1::2]), mode, q.shape)
