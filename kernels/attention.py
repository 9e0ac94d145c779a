"""Tube attention in Triton: FlashAttention-2 style forward and backward over [B, H, T, K, Dh].

The three modes are one kernel with different index maps. A program works on one
attention group (b, h, g) and a block of its L tokens; token i of a group sits at

    offset(i) = b*s_b + h*s_h + g*s_g + (i // INNER)*s_outer + (i % INNER)*s_inner

    joint: G = 1, L = T*K, INNER = K, s_outer = s_T, s_inner = s_K
    slice: G = T, L = K,   s_g = s_T, s_inner = s_K   (INNER = L, so s_outer is unused)
    tube:  G = K, L = T,   s_g = s_K, s_inner = s_T

so q, k, v (and o, do) are read in place with their own strides: no reshape or transpose
copies, no materialised masks. Softmax is online in base 2 with fp32 accumulation; the
forward saves the base-2 logsumexp per row, the backward recomputes P from it (FA2:
delta = rowsum(dO * O), one kernel for dK/dV over query blocks, one for dQ over key blocks).

A CLS token per slice is not a separate argument: the phase projector prepends each
slice's CLS into the K dimension ([B, H, T, K+1, Dh]) and uses mode "slice".

fp32 inputs use IEEE fp32 dots (not TF32) so fp32 results match the reference closely.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tok(i, INNER, s_outer, s_inner):
    # Offset of token i inside its group (see module docstring).
    return (i // INNER) * s_outer + (i % INNER) * s_inner


@triton.jit
def _group_base(pid, H, G, sb, sh, sg):
    # Offset of group pid = (b, h, g) in row-major order over [B, H, G]; int64 for big batches.
    b = (pid // (H * G)).to(tl.int64)
    h = ((pid // G) % H).to(tl.int64)
    g = (pid % G).to(tl.int64)
    return b * sb + h * sh + g * sg


@triton.jit
def _load_rows(ptr, base, rows, cols, L, INNER, s_outer, s_inner, s_d, Dh):
    # [len(rows), len(cols)] tile of tokens `rows`, features `cols`; 0 outside L x Dh.
    offs = base + _tok(rows, INNER, s_outer, s_inner)[:, None] + cols[None, :] * s_d
    return tl.load(ptr + offs, mask=(rows < L)[:, None] & (cols < Dh)[None, :], other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, H, G, L, INNER, Dh,
                sqb, sqh, sqg, sqo, sqi, sqd, skb, skh, skg, sko, ski, skd,
                svb, svh, svg, svo, svi, svd, sob, soh, sog, soo, soi, sod,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, _group_base(pid, H, G, sqb, sqh, sqg), rows, cols, L, INNER, sqo, sqi, sqd, Dh)
    k_base = _group_base(pid, H, G, skb, skh, skg)
    v_base = _group_base(pid, H, G, svb, svh, svg)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, k_base, keys, cols, L, INNER, sko, ski, skd, Dh)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((keys < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 of the first block is always valid
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, v_base, keys, cols, L, INNER, svo, svi, svd, Dh)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o_base = _group_base(pid, H, G, sob, soh, sog)
    o_offs = o_base + _tok(rows, INNER, soo, soi)[:, None] + cols[None, :] * sod
    tl.store(O + o_offs, (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=(rows < L)[:, None] & (cols < Dh)[None, :])
    tl.store(LSE + pid.to(tl.int64) * L + rows, m_i + tl.log2(l_i), mask=rows < L)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, H, G, L, INNER, Dh,
                      sob, soh, sog, soo, soi, sod, sdb, sdh, sdg, sdo, sdi, sdd,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[row] = sum_d O * dO: the softmax-backward correction, once per row.
    pid = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = _load_rows(O, _group_base(pid, H, G, sob, soh, sog), rows, cols, L, INNER, soo, soi, sod, Dh)
    do = _load_rows(DO, _group_base(pid, H, G, sdb, sdh, sdg), rows, cols, L, INNER, sdo, sdi, sdd, Dh)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, H, G, L, INNER, Dh,
                     sqb, sqh, sqg, sqo, sqi, sqd, skb, skh, skg, sko, ski, skd,
                     svb, svh, svg, svo, svi, svd, sdb, sdh, sdg, sdo, sdi, sdd,
                     sgb, sgh, sgg, sgo, sgi, sgd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    # One block of keys; loop over all query blocks of the group. Works on transposed
    # scores (keys x queries) so dV = P^T dO and dK = dS^T Q need no transposes of P.
    pid = tl.program_id(0)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = _load_rows(K, _group_base(pid, H, G, skb, skh, skg), keys, cols, L, INNER, sko, ski, skd, Dh)
    v = _load_rows(V, _group_base(pid, H, G, svb, svh, svg), keys, cols, L, INNER, svo, svi, svd, Dh)
    q_base = _group_base(pid, H, G, sqb, sqh, sqg)
    do_base = _group_base(pid, H, G, sdb, sdh, sdg)
    row_stats = pid.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        valid = (keys < L)[:, None] & (rows < L)[None, :]
        q = _load_rows(Q, q_base, rows, cols, L, INNER, sqo, sqi, sqd, Dh)
        do = _load_rows(DO, do_base, rows, cols, L, INNER, sdo, sdi, sdd, Dh)
        lse = tl.load(LSE + row_stats + rows, mask=rows < L, other=0.0)
        delta = tl.load(DELTA + row_stats + rows, mask=rows < L, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    mask = (keys < L)[:, None] & (cols < Dh)[None, :]
    g_offs = _group_base(pid, H, G, sgb, sgh, sgg) + _tok(keys, INNER, sgo, sgi)[:, None] + cols[None, :] * sgd
    # DK and DV share one layout (both allocated like k).
    tl.store(DK + g_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, H, G, L, INNER, Dh,
                   sqb, sqh, sqg, sqo, sqi, sqd, skb, skh, skg, sko, ski, skd,
                   svb, svh, svg, svo, svi, svd, sdb, sdh, sdg, sdo, sdi, sdd,
                   sgb, sgh, sgg, sgo, sgi, sgd,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    # One block of queries; loop over all key blocks: dQ = dS K * scale.
    pid = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, _group_base(pid, H, G, sqb, sqh, sqg), rows, cols, L, INNER, sqo, sqi, sqd, Dh)
    do = _load_rows(DO, _group_base(pid, H, G, sdb, sdh, sdg), rows, cols, L, INNER, sdo, sdi, sdd, Dh)
    row_stats = pid.to(tl.int64) * L
    lse = tl.load(LSE + row_stats + rows, mask=rows < L, other=0.0)
    delta = tl.load(DELTA + row_stats + rows, mask=rows < L, other=0.0)
    k_base = _group_base(pid, H, G, skb, skh, skg)
    v_base = _group_base(pid, H, G, svb, svh, svg)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, k_base, keys, cols, L, INNER, sko, ski, skd, Dh)
        v = _load_rows(V, v_base, keys, cols, L, INNER, svo, svi, svd, Dh)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where((rows < L)[:, None] & (keys < L)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    mask = (rows < L)[:, None] & (cols < Dh)[None, :]
    g_offs = _group_base(pid, H, G, sgb, sgh, sgg) + _tok(rows, INNER, sgo, sgi)[:, None] + cols[None, :] * sgd
    tl.store(DQ + g_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


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


def _config(L: int, dh: int, kernel: str) -> dict:
    """Launch config of kernel "fwd" | "dkdv" | "dq" for groups of L tokens, head dim dh.

    Each kernel keeps a *tile* of rows resident (queries for fwd/dq, keys for dkdv) and
    loops over the group in *steps*: FA2-like large tiles, short steps; whole groups when
    they are short (tube, slice). benchmarks/kernels.py sweeps the alternatives.
    """
    block_d = max(16, triton.next_power_of_2(dh))
    wide = block_d > 64  # Dh 128: halve the tile to stay within registers
    tile, step = (64 if wide else 128), (32 if wide or kernel != "fwd" else 64)
    tile, step = (min(c, max(16, triton.next_power_of_2(L))) for c in (tile, step))
    block_m, block_n = (step, tile) if kernel == "dkdv" else (tile, step)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8 if tile * block_d >= 8192 else 4)


def _precision(x: torch.Tensor) -> str:
    # IEEE for fp32 (TF32 would cost ~1e-3 relative error); half types ignore it.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float,
                  out: torch.Tensor | None = None, lse: torch.Tensor | None = None, cfg: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, K, Dh] (any strides) -> (o [B, H, T, K, Dh], lse fp32 [B*H*G, L] base 2).

    out/lse: optional preallocated results; cfg: launch config (BLOCK_M, BLOCK_N, BLOCK_D,
    num_warps, num_stages) instead of `_config(L, Dh, "fwd")`.
    """
    b, h, _, _, dh = q.shape
    groups, length, inner = _geometry(q.shape, mode)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if lse is None:
        lse = torch.empty((b * h * groups, length), dtype=torch.float32, device=q.device)
    cfg = cfg or _config(length, dh, "fwd")
    grid = (b * h * groups, triton.cdiv(length, cfg["BLOCK_M"]))
    _fwd_kernel[grid](q, k, v, out, lse, scale * LOG2E, h, groups, length, inner, dh,
                      *_strides(q, mode), *_strides(k, mode), *_strides(v, mode), *_strides(out, mode),
                      PRECISION=_precision(q), **cfg)
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
    cfg = {"dkdv": _config(length, dh, "dkdv"), "dq": _config(length, dh, "dq"), **(cfg or {})}
    rows = b * h * groups
    pre = _config(length, dh, "dkdv")  # short row blocks: delta is a cheap elementwise pass
    _bwd_delta_kernel[(rows, triton.cdiv(length, pre["BLOCK_M"]))](
        o, do, delta, h, groups, length, inner, dh, *_strides(o, mode), *_strides(do, mode),
        BLOCK_M=pre["BLOCK_M"], BLOCK_D=pre["BLOCK_D"], num_warps=4)
    common = (scale * LOG2E, scale, h, groups, length, inner, dh,
              *_strides(q, mode), *_strides(k, mode), *_strides(v, mode), *_strides(do, mode))
    kv = cfg["dkdv"]
    _bwd_dkdv_kernel[(rows, triton.cdiv(length, kv["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, *common, *_strides(dk, mode), PRECISION=_precision(q), **kv)
    qc = cfg["dq"]
    _bwd_dq_kernel[(rows, triton.cdiv(length, qc["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, *common, *_strides(dq, mode), PRECISION=_precision(q), **qc)
    return dq, dk, dv


class _TubeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mode, scale):
        o, lse = attention_fwd(q, k, v, mode, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mode, ctx.scale = mode, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.mode, ctx.scale)
        return dq, dk, dv, None, None


def tube_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                   scale: float | None = None) -> torch.Tensor:
    """Triton twin of `echofm.kernels.tube_attention`: q, k, v [B, H, T, K, Dh] fp32/fp16/bf16."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"tube_attention (triton): q, k, v must share fp32/fp16/bf16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    return _TubeAttention.apply(q, k, v, mode, q.shape[-1] ** -0.5 if scale is None else float(scale))
