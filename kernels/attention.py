"""Tube attention in Triton: FlashAttention-2 style forward and backward over [B, H, T, K, Dh].

The three modes are one set of kernels with different index maps. Attention runs inside
groups of L tokens (G groups per head); token i of group g of head (b, h) sits at

    offset = b*s_b + h*s_h + g*s_g + (i // INNER)*s_outer + (i % INNER)*s_inner

    joint: G = 1, L = T*K, INNER = K, s_outer = s_T, s_inner = s_K
    slice: G = T, L = K,   s_g = s_T, s_inner = s_K   (INNER = L, so s_outer is unused)
    tube:  G = K, L = T,   s_g = s_K, s_inner = s_T

so q, k, v (and o, do) are read in place with their own strides: no reshape or transpose
copies, no materialised masks. A program owns a *pack* of GPB consecutive groups of one
head, seen as GPB*L rows: long groups (joint, slice) are packs of one, cut into tiles;
short groups (tube, L = T = 8) are packed several to a tile so the matrix units are not
mostly padding, and a score only counts when row and key are in the same group.

Softmax is online in base 2 with fp32 accumulation; the forward saves the base-2
logsumexp per row, the backward recomputes P from it (FA2: delta = rowsum(dO * O), one
kernel for dK/dV looping over queries, one for dQ looping over keys; no atomics).
Masked scores are a large finite negative rather than -inf, so padding rows never make NaN.

A CLS token per slice is not a separate argument: the phase projector prepends each
slice's CLS into the K dimension ([B, H, T, K+1, Dh]) and uses mode "slice".

fp32 inputs use IEEE fp32 dots (not TF32) so fp32 results match the reference closely.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NEG: tl.constexpr = tl.constexpr(-1.0e30)  # masked score (base 2): exp2(NEG - m) == 0 for any real max m


@triton.jit
def _program(pid, H, G, GPB):
    # Program -> (b, h) as int64 scalars and the first group g0 of its pack.
    packs = tl.cdiv(G, GPB)
    bh = (pid // packs).to(tl.int64)
    return bh // H, bh % H, (pid % packs) * GPB


@triton.jit
def _rows(r, L, G, g0, GPB):
    # Rows r of a pack -> (group within the pack, token, valid).
    gi = r // L
    return gi, r % L, (r < GPB * L) & (g0 + gi < G)


@triton.jit
def _base(ptr, b, h, g0, sb, sh, sg):
    # Scalar pointer to group g0 of head (b, h): the only 64-bit offset arithmetic.
    return ptr + b * sb + h * sh + g0.to(tl.int64) * sg


@triton.jit
def _offs(r, gi, i, INNER, sg, so, si, FLAT: tl.constexpr):
    # int32 offsets of pack rows r = (gi, i) from the pack's base (see module docstring).
    # FLAT (decided on the host): rows are evenly spaced, r * si, as in contiguous layouts.
    if FLAT:
        return r * si
    return gi * sg + (i // INNER) * so + (i % INNER) * si


@triton.jit
def _load(ptr, offs, valid, cols, sd, Dh):
    # [rows, BLOCK_D] tile; 0 for invalid rows and padded features.
    return tl.load(ptr + offs[:, None] + cols[None, :] * sd, mask=valid[:, None] & (cols < Dh)[None, :], other=0.0)


@triton.jit
def _store(ptr, offs, valid, cols, sd, Dh, val):
    tl.store(ptr + offs[:, None] + cols[None, :] * sd, val.to(ptr.dtype.element_ty),
             mask=valid[:, None] & (cols < Dh)[None, :])


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, H, G, L, INNER, Dh, GPB,
                sqb, sqh, sqg, sqo, sqi, sqd, skb, skh, skg, sko, ski, skd,
                svb, svh, svg, svo, svi, svd, sob, soh, sog, soo, soi, sod,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PACKED: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr):
    b, h, g0 = _program(tl.program_id(0), H, G, GPB)
    Qp, Kp = _base(Q, b, h, g0, sqb, sqh, sqg), _base(K, b, h, g0, skb, skh, skg)
    Vp, Op = _base(V, b, h, g0, svb, svh, svg), _base(O, b, h, g0, sob, soh, sog)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    g_r, i_r, ok_r = _rows(rows, L, G, g0, GPB)
    cols = tl.arange(0, BLOCK_D)
    q = _load(Qp, _offs(rows, g_r, i_r, INNER, sqg, sqo, sqi, FLAT), ok_r, cols, sqd, Dh)

    m_i = tl.full([BLOCK_M], NEG, tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, GPB * L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        g_c, i_c, ok_c = _rows(keys, L, G, g0, GPB)
        k = _load(Kp, _offs(keys, g_c, i_c, INNER, skg, sko, ski, FLAT), ok_c, cols, skd, Dh)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = ok_c[None, :]
        if PACKED:
            keep = keep & (g_r[:, None] == g_c[None, :])
        s = tl.where(keep, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what earlier key blocks accumulated
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(Vp, _offs(keys, g_c, i_c, INNER, svg, svo, svi, FLAT), ok_c, cols, svd, Dh)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    _store(Op, _offs(rows, g_r, i_r, INNER, sog, soo, soi, FLAT), ok_r, cols, sod, Dh, acc / l_i[:, None])
    # Row stats live in [B*H*G, L]: the pack's rows are contiguous there.
    stats = LSE + ((b * H + h) * G + g0) * L
    tl.store(stats + rows, m_i + tl.log2(l_i), mask=ok_r)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, H, G, L, INNER, Dh, GPB,
                      sob, soh, sog, soo, soi, sod, sdb, sdh, sdg, sdo, sdi, sdd,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr):
    # delta[row] = sum_d O * dO: the softmax-backward correction, once per row.
    b, h, g0 = _program(tl.program_id(0), H, G, GPB)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    g, i, ok = _rows(rows, L, G, g0, GPB)
    cols = tl.arange(0, BLOCK_D)
    o = _load(_base(O, b, h, g0, sob, soh, sog), _offs(rows, g, i, INNER, sog, soo, soi, FLAT), ok, cols, sod, Dh)
    do = _load(_base(DO, b, h, g0, sdb, sdh, sdg), _offs(rows, g, i, INNER, sdg, sdo, sdi, FLAT), ok, cols, sdd, Dh)
    stats = DELTA + ((b * H + h) * G + g0) * L
    tl.store(stats + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, H, G, L, INNER, Dh, GPB,
                     sqb, sqh, sqg, sqo, sqi, sqd, skb, skh, skg, sko, ski, skd,
                     svb, svh, svg, svo, svi, svd, sdb, sdh, sdg, sdo, sdi, sdd,
                     sgb, sgh, sgg, sgo, sgi, sgd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PACKED: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr):
    # A tile of keys; loop over the pack's queries. Works on transposed scores (keys x
    # queries) so dV = P^T dO and dK = dS^T Q need no transposes of P.
    b, h, g0 = _program(tl.program_id(0), H, G, GPB)
    Qp, DOp = _base(Q, b, h, g0, sqb, sqh, sqg), _base(DO, b, h, g0, sdb, sdh, sdg)
    row0 = ((b * H + h) * G + g0) * L
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g_c, i_c, ok_c = _rows(keys, L, G, g0, GPB)
    cols = tl.arange(0, BLOCK_D)
    k = _load(_base(K, b, h, g0, skb, skh, skg), _offs(keys, g_c, i_c, INNER, skg, sko, ski, FLAT), ok_c, cols, skd, Dh)
    v = _load(_base(V, b, h, g0, svb, svh, svg), _offs(keys, g_c, i_c, INNER, svg, svo, svi, FLAT), ok_c, cols, svd, Dh)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, GPB * L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        g_r, i_r, ok_r = _rows(rows, L, G, g0, GPB)
        q = _load(Qp, _offs(rows, g_r, i_r, INNER, sqg, sqo, sqi, FLAT), ok_r, cols, sqd, Dh)
        do = _load(DOp, _offs(rows, g_r, i_r, INNER, sdg, sdo, sdi, FLAT), ok_r, cols, sdd, Dh)
        lse = tl.load(LSE + row0 + rows, mask=ok_r, other=0.0)
        delta = tl.load(DELTA + row0 + rows, mask=ok_r, other=0.0)
        valid = ok_c[:, None] & ok_r[None, :]
        if PACKED:
            valid = valid & (g_c[:, None] == g_r[None, :])
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    # DK and DV share one layout (attention_bwd checks).
    offs = _offs(keys, g_c, i_c, INNER, sgg, sgo, sgi, FLAT)
    _store(_base(DK, b, h, g0, sgb, sgh, sgg), offs, ok_c, cols, sgd, Dh, dk * sm_scale)
    _store(_base(DV, b, h, g0, sgb, sgh, sgg), offs, ok_c, cols, sgd, Dh, dv)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, H, G, L, INNER, Dh, GPB,
                   sqb, sqh, sqg, sqo, sqi, sqd, skb, skh, skg, sko, ski, skd,
                   svb, svh, svg, svo, svi, svd, sdb, sdh, sdg, sdo, sdi, sdd,
                   sgb, sgh, sgg, sgo, sgi, sgd,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PACKED: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr):
    # A tile of queries; loop over the pack's keys: dQ = dS K * scale.
    b, h, g0 = _program(tl.program_id(0), H, G, GPB)
    Kp, Vp = _base(K, b, h, g0, skb, skh, skg), _base(V, b, h, g0, svb, svh, svg)
    row0 = ((b * H + h) * G + g0) * L
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    g_r, i_r, ok_r = _rows(rows, L, G, g0, GPB)
    cols = tl.arange(0, BLOCK_D)
    q = _load(_base(Q, b, h, g0, sqb, sqh, sqg), _offs(rows, g_r, i_r, INNER, sqg, sqo, sqi, FLAT), ok_r, cols, sqd, Dh)
    do = _load(_base(DO, b, h, g0, sdb, sdh, sdg), _offs(rows, g_r, i_r, INNER, sdg, sdo, sdi, FLAT), ok_r, cols, sdd, Dh)
    lse = tl.load(LSE + row0 + rows, mask=ok_r, other=0.0)
    delta = tl.load(DELTA + row0 + rows, mask=ok_r, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, GPB * L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        g_c, i_c, ok_c = _rows(keys, L, G, g0, GPB)
        k = _load(Kp, _offs(keys, g_c, i_c, INNER, skg, sko, ski, FLAT), ok_c, cols, skd, Dh)
        v = _load(Vp, _offs(keys, g_c, i_c, INNER, svg, svo, svi, FLAT), ok_c, cols, svd, Dh)
        valid = ok_r[:, None] & ok_c[None, :]
        if PACKED:
            valid = valid & (g_r[:, None] == g_c[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    offs = _offs(rows, g_r, i_r, INNER, sgg, sgo, sgi, FLAT)
    _store(_base(DQ, b, h, g0, sgb, sgh, sgg), offs, ok_r, cols, sgd, Dh, dq * sm_scale)


# ---- host side -----------------------------------------------------------------------------


def _geometry(shape: torch.Size, mode: str) -> tuple[int, int, int]:
    """(G groups per head, L tokens per group, INNER) for [B, H, T, K, Dh]."""
    _, _, t, k, _ = shape
    return {"joint": (1, t * k, k), "slice": (t, k, k), "tube": (k, t, t)}[mode]


def _strides(x: torch.Tensor, mode: str) -> tuple[int, ...]:
    """(s_b, s_h, s_g, s_outer, s_inner, s_d) of x [B, H, T, K, Dh] for the kernels' index map."""
    sb, sh, st, sk, sd = x.stride()
    return {"joint": (sb, sh, 0, st, sk, sd), "slice": (sb, sh, st, 0, sk, sd),
            "tube": (sb, sh, sk, 0, st, sd)}[mode]


def _config(L: int, G: int, dh: int, kernel: str) -> dict:
    """Launch config of kernel "fwd" | "dkdv" | "dq" for G groups of L tokens, head dim dh.

    Each kernel keeps a *tile* of rows resident (queries for fwd/dq, keys for dkdv) and
    loops over its pack in *steps*: FA2-like large tiles and short steps for long groups;
    groups of <= 32 tokens are packed GPB to a tile of at most 64 rows.
    benchmarks/kernels.py sweeps the alternatives.
    """
    block_d = max(16, triton.next_power_of_2(dh))
    wide = block_d > 64  # Dh 128: smaller key tiles and more warps stay within registers
    if 2 * L <= 64:
        gpb = min(G, 64 // L)
        tile = step = max(16, triton.next_power_of_2(gpb * L))
    else:
        gpb = 1
        # Measured on an H200 (benchmarks/results/kernels_gpu.json, bf16). Dh 64 (ViT
        # encoders): 64-query tiles with 32-key steps and 4 warps beat 128 x 64 with 8
        # warps by 1.3x fwd+bwd; dK/dV keeps 128 resident keys. Dh 32 (the decoder): 128 x 64
        # tiles stay faster (209 vs 166 TF/s fwd).
        if block_d <= 32:
            tile, step = 128, (64 if kernel == "fwd" else 32)
        else:
            tile, step = (128 if kernel == "dkdv" and not wide else 64), 32
        tile, step = (min(c, max(16, triton.next_power_of_2(L))) for c in (tile, step))
    block_m, block_n = (step, tile) if kernel == "dkdv" else (tile, step)
    # Warps: packed tiles usually take the div/mod index path, which needs more registers
    # (8 warps avoid spills there, ptxas -v, sm_90); long groups run fastest with 4.
    warps = (8 if tile * block_d >= 4096 else 4) if gpb > 1 else (8 if wide else 4)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GPB=gpb, num_warps=warps)


def _launch(cfg: dict, mode: str, tile: str, *tensors: torch.Tensor) -> tuple[tuple[int, int], int, dict]:
    """(grid, GPB, meta-parameters) of a kernel config over `tensors` ([B, H, T, K, Dh] each).

    `tile` names the config's resident block. FLAT: every tensor's pack rows are evenly
    spaced (a contiguous layout), so the kernel skips the div/mod index map.
    """
    b, h = tensors[0].shape[:2]
    groups, length, inner = _geometry(tensors[0].shape, mode)
    kw = dict(cfg)
    gpb = kw.pop("GPB", 1)
    kw["FLAT"] = True
    for x in tensors:
        _, _, sg, so, si, _ = _strides(x, mode)
        kw["FLAT"] &= (inner == length or so == inner * si) and (gpb == 1 or sg == length * si)
    if "BLOCK_N" in cfg:  # the delta kernel has no key blocks and never packs scores
        kw["PACKED"] = gpb > 1
    return (b * h * triton.cdiv(groups, gpb), triton.cdiv(gpb * length, cfg[tile])), gpb, kw


def _precision(x: torch.Tensor) -> str:
    # IEEE for fp32 (TF32 would cost ~1e-3 relative error); half types ignore it.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float,
                  out: torch.Tensor | None = None, lse: torch.Tensor | None = None, cfg: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, K, Dh] (any strides) -> (o [B, H, T, K, Dh], lse fp32 [B*H*G, L] base 2).

    out/lse: optional preallocated results; cfg: launch config (BLOCK_M, BLOCK_N, BLOCK_D,
    GPB, num_warps, num_stages) instead of `_config(L, G, Dh, "fwd")`.
    """
    b, h, _, _, dh = q.shape
    groups, length, inner = _geometry(q.shape, mode)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if lse is None:
        lse = torch.empty((b * h * groups, length), dtype=torch.float32, device=q.device)
    cfg = cfg or _config(length, groups, dh, "fwd")
    grid, gpb, kw = _launch(cfg, mode, "BLOCK_M", q, k, v, out)
    _fwd_kernel[grid](q, k, v, out, lse, scale * LOG2E, h, groups, length, inner, dh, gpb,
                      *_strides(q, mode), *_strides(k, mode), *_strides(v, mode), *_strides(out, mode),
                      PRECISION=_precision(q), **kw)
    return out, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, mode: str, scale: float, dq: torch.Tensor | None = None,
                  dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, cfg: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), each [B, H, T, K, Dh] in q's dtype; dk and dv must share strides.

    dq/dk/dv: optional preallocated results; cfg: {"dkdv": ..., "dq": ...} launch configs
    (either or both) instead of `_config`'s.
    """
    b, h, _, _, dh = q.shape
    groups, length, inner = _geometry(q.shape, mode)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) if t is None else t for t in (dq, dk, dv))
    if dk.stride() != dv.stride():
        raise ValueError("attention_bwd: dk and dv must have the same strides")
    delta = torch.empty_like(lse)
    cfg = {"dkdv": _config(length, groups, dh, "dkdv"), "dq": _config(length, groups, dh, "dq"), **(cfg or {})}
    # delta: a cheap row-wise pass, tiled like the default dq kernel's queries.
    pre = _config(length, groups, dh, "dq")
    grid, gpb, kw = _launch({"BLOCK_M": pre["BLOCK_M"], "BLOCK_D": pre["BLOCK_D"], "GPB": pre["GPB"]},
                            mode, "BLOCK_M", o, do)
    _bwd_delta_kernel[grid](o, do, delta, h, groups, length, inner, dh, gpb, *_strides(o, mode), *_strides(do, mode),
                            num_warps=4, **kw)
    common = (scale * LOG2E, scale, h, groups, length, inner, dh)
    strides = (*_strides(q, mode), *_strides(k, mode), *_strides(v, mode), *_strides(do, mode))
    grid, gpb, kw = _launch(cfg["dkdv"], mode, "BLOCK_N", q, k, v, do, dk, dv)
    _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, *common, gpb, *strides, *_strides(dk, mode),
                           PRECISION=_precision(q), **kw)
    grid, gpb, kw = _launch(cfg["dq"], mode, "BLOCK_M", q, k, v, do, dq)
    _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *common, gpb, *strides, *_strides(dq, mode),
                         PRECISION=_precision(q), **kw)
    return dq, dk, dv


# Custom ops rather than an autograd.Function: torch.compile and CUDA graphs see one opaque
# kernel call with known output shapes (the fake implementations), not host-side launch code.
@torch.library.custom_op("echofm::tube_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, mode, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, mode, scale):
    b, h = q.shape[:2]
    groups, length, _ = _geometry(q.shape, mode)
    return q.new_empty(q.shape), q.new_empty((b * h * groups, length), dtype=torch.float32)


@torch.library.custom_op("echofm::tube_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, mode: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, mode, scale)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, mode, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mode, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mode, ctx.scale = mode, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.mode, ctx.scale)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def tube_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                   scale: float | None = None) -> torch.Tensor:
    """Triton twin of `echofm.kernels.tube_attention`: q, k, v [B, H, T, K, Dh] fp32/fp16/bf16."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"tube_attention (triton): q, k, v must share fp32/fp16/bf16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    return _fwd_op(q, k, v, mode, q.shape[-1] ** -0.5 if scale is None else float(scale))[0]
