"""Triton kernels for masked video pretraining, with torch reference twins.

Public API (masking gather, tube attention); all four are differentiable:

- `gather_tokens(x, ids)`: x [B, N, D], ids int64 [B, K] -> [B, K, D].
- `scatter_tokens(y, ids, fill, n)`: [B, n, D] with y [B, K, D] at ids, fill ([D], or
  broadcastable to [B, n, D]) elsewhere (the decoder's unshuffle). Gradients for y, fill.
- `gather_patches(video, ids, patch, mean=None, std=None, channels_last=False)`: video
  [B, T, H, W, C] uint8 or float, ids over the (T/t)(H/p)(W/p) patch grid in (t, h, w)
  order -> [B, K, C*t*p*p] in (C, t, p, p) order (Conv3d weight order; (t, p, p, C) with
  channels_last); uint8 -> float32 (x/255 - mean)/std.
- `tube_attention(q, k, v, mode, scale=None, backend="auto")`: q, k, v [B, H, T, K, Dh],
  mode joint | slice | tube.

ids must be unique within a row (masking permutations are): the Triton backward of the
gathers is a plain scatter, not a scatter-add.

Backends: the gathers take `backend="auto" | "triton" | "torch"` (`auto`: Triton on CUDA
tensors, torch elsewhere). tube_attention takes `"auto" | "triton" | "sdpa" | "sdpa-cudnn" |
"sdpa-flash" | "sdpa-efficient" | "xformers" | "math"`: `auto` runs the kernel measured
fastest for the call's (mode, head dim, token bucket, dtype, GPU) from the committed table
kernels/attention_table.json, with the fallback rule of `dispatch.py` (CPU: sdpa); `sdpa`
lets torch pick its kernel, `sdpa-*` pin one (torch.nn.attention.sdpa_kernel); an explicit
name always forces that backend. `triton` also runs CPU tensors when TRITON_INTERPRET=1 was
set before this package was imported (that is how the tests run it).

Imports nothing else of ours (README: What is where).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import dispatch, reference

__all__ = ["gather_tokens", "scatter_tokens", "gather_patches", "tube_attention", "attention_backend"]

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", *reference.SDPA_PINNED, "xformers", "math")
GATHER_BACKENDS = ("auto", "triton", "torch")


def _use_triton(t: torch.Tensor, backend: str, choices: tuple[str, ...], name: str) -> bool:
    """Resolve `backend` for tensor t: True means the Triton path (auto: on CUDA tensors)."""
    if backend not in choices:
        raise ValueError(f"{name}: backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        return t.is_cuda
    if backend == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise reference.BackendUnavailable(f"{name}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                                           "set before importing echofm.kernels to run CPU tensors in the interpreter")
    return backend == "triton"


def _check_ids(name: str, ids: torch.Tensor, data: torch.Tensor) -> None:
    """ids must be integer [B, K] on data's device (cheap checks only: no device sync)."""
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name}: ids must be an integer [B, K] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if ids.device != data.device or ids.shape[0] != data.shape[0]:
        raise ValueError(f"{name}: ids {tuple(ids.shape)} on {ids.device} do not match the data "
                         f"{tuple(data.shape)} on {data.device}")


def gather_tokens(x: torch.Tensor, ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [B, N, D] (any float dtype), ids int64 [B, K] -> [B, K, D] rows x[b, ids[b, k]]."""
    _check_ids("gather_tokens", ids, x)
    if _use_triton(x, backend, GATHER_BACKENDS, "gather_tokens"):
        from .gather import gather_tokens as impl

        return impl(x, ids)
    return reference.gather_tokens(x, ids)


def scatter_tokens(
    y: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor, n: int, backend: str = "auto"
) -> torch.Tensor:
    """y [B, K, D] at rows ids [B, K] of a [B, n, D] tensor that is `fill` elsewhere; dtype of y.

    fill: [D] (the mask token; [1, 1, D] works too) or anything broadcastable to [B, n, D].
    Differentiable w.r.t. y and fill.
    """
    _check_ids("scatter_tokens", ids, y)
    if _use_triton(y, backend, GATHER_BACKENDS, "scatter_tokens"):
        from .gather import scatter_tokens as impl

        return impl(y, ids, fill, n)
    return reference.scatter_tokens(y, ids, fill, n)


def gather_patches(
    video: torch.Tensor,
    ids: torch.Tensor,
    patch: tuple[int, int, int],
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    backend: str = "auto",
    channels_last: bool = False,
) -> torch.Tensor:
    """video [B, T, H, W, C] uint8|float, ids int64 [B, K] over the patch grid, patch (t, p, p)
    -> [B, K, C*t*p*p] (float32 for uint8 input, else the video's dtype), each patch in
    (C, t, p, p) order (a Conv3d weight's), or (t, p, p, C) with channels_last (the clip's
    own order: the official decoder_pred target layout).

    uint8: (x/255 - mean)/std per channel (mean 0, std 1 if not given); float: unchanged, or
    (x - mean)/std when mean/std are given. Differentiable w.r.t. a float video.
    """
    _check_ids("gather_patches", ids, video)
    if video.dim() != 5:
        raise ValueError(f"gather_patches: video must be [B, T, H, W, C], got {tuple(video.shape)}")
    if _use_triton(video, backend, GATHER_BACKENDS, "gather_patches"):
        from .gather import gather_patches as impl

        x = impl(video, ids, tuple(patch), mean, std)
        if not channels_last:
            return x
        b, k, c = x.shape[0], x.shape[1], video.shape[-1]
        return x.view(b, k, c, -1).transpose(2, 3).reshape(b, k, -1)
    return reference.gather_patches(video, ids, tuple(patch), mean, std, channels_last)


def attention_backend(q: torch.Tensor, mode: str, train: bool) -> str:
    """The backend `auto` runs for q [B, H, T, K, Dh] (dispatch.py: table, then fallback rule)."""
    cap = None
    if q.is_cuda:
        props = torch.cuda.get_device_properties(q.device)  # cached by torch; constant under compile
        cap = f"{props.major}.{props.minor}"
    _, _, t, k, dh = q.shape
    length = {"joint": t * k, "slice": k, "tube": t}[mode]
    return dispatch.choose(dispatch.TABLE, mode=mode, dh=dh, length=length,
                           dtype=str(q.dtype).removeprefix("torch."), capability=cap, train=train)


def tube_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention over the tube layout. q, k, v [B, H, T, K, Dh] -> [B, H, T, K, Dh].

    mode "joint": all T*K tokens attend to each other (the encoder); "slice": the K tokens
    of one t (the phase projector: prepend the slice's CLS into the K dimension, i.e. pass
    [B, H, T, K+1, Dh]); "tube": the T tokens of one spatial position k. scale defaults to
    Dh**-0.5. backend "auto" picks per call from the measured table (`attention_backend`:
    forward+backward winners when a gradient is needed, forward winners otherwise).
    """
    if mode not in reference.MODES:
        raise ValueError(f"tube_attention: mode must be one of {reference.MODES}, got {mode!r}")
    if not (q.shape == k.shape == v.shape) or q.dim() != 5:
        raise ValueError(f"tube_attention: q, k, v must share one [B, H, T, K, Dh] shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"tube_attention: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        backend = attention_backend(q, mode, train)
    if _use_triton(q, backend, ATTENTION_BACKENDS, "tube_attention"):
        from .attention import tube_attention as impl

        return impl(q, k, v, mode, scale)
    if backend == "math":
        return reference.tube_attention(q, k, v, mode, scale)
    if backend == "xformers":
        return reference.tube_attention_xformers(q, k, v, mode, scale)
    return reference.tube_attention_sdpa(q, k, v, mode, scale, pinned=None if backend == "sdpa" else backend)
