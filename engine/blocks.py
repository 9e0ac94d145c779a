"""The transformer blocks of EchoFM (engine/model.py): pre-norm ViT blocks with a fused qkv
Linear whose q / k / v load the official checkpoints' separate ones, attention through
echofm.kernels (joint, or divided slice / tube), and an output restricted to some rows (the
decoder's last block in training: only the removed tokens' rows are read).

Shapes: x [B, n, D] float; rows int64 [B, M]; heads H, Dh = D / H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from echofm.kernels import tube_attention

LN_EPS = 1e-6  # the official presets' LayerNorm eps


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention with a fused qkv Linear; the official q/k/v map onto it."""

    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., n, D] -> q, k, v [..., H, n, Dh] (views of one GEMM output, no copies)."""
        *lead, n, d = x.shape
        qkv = self.qkv(x).view(*lead, n, 3, self.heads, d // self.heads)
        qkv = qkv.movedim(-3, 0).movedim(-2, -3)  # [3, ..., H, n, Dh]
        q, k, v = qkv.unbind(0)  # one backward (a stack), not three zero-filled [3, ...] selects summed
        return q, k, v

    @staticmethod
    def merge(o: torch.Tensor) -> torch.Tensor:
        """[..., H, n, Dh] -> [..., n, H*Dh]."""
        return o.movedim(-3, -2).flatten(-2)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None, mode: str,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 1 + Nv, D] (row 0 = CLS, then tokens in (t, k) order) -> [B, 1 + Nv, D];
        with rows int64 [B, M] (joint only): the output at those rows only, [B, M, D]
        (every row is a key, only these are queries)."""
        q, k, v = self.qkv_heads(x)  # [B, H, n, Dh]
        if rows is not None:
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))  # [B, H, M, Dh]
            o = self._cross(q, k, v)
        elif mode == "joint":
            o = tube_attention(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), "joint",
                               backend=self.backend).squeeze(2)
        else:
            t, kk = grid
            tok = [a[:, :, 1:].unflatten(2, (t, kk)) for a in (q, k, v)]  # [B, H, T', K, Dh] views
            o_tok = tube_attention(*tok, mode, backend=self.backend).flatten(2, 3)
            # The CLS is outside the tube layout: its own query over [CLS, all tokens].
            o_cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)
            o = torch.cat([o_cls, o_tok], dim=2)
        return self.proj(self.merge(o))

    def _cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Fewer queries than keys, [B, H, M, Dh] x [B, H, n, Dh] -> [B, H, M, Dh]: SDPA (the
        tube kernels take equal lengths), or the explicit softmax for the math backend."""
        if self.backend != "math":
            return F.scaled_dot_product_attention(q, k, v)
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        s = (q.to(work) @ k.to(work).transpose(-1, -2)) * q.shape[-1] ** -0.5
        return (torch.softmax(s, dim=-1) @ v.to(work)).to(q.dtype)


class Block(nn.Module):
    """Pre-norm ViT block (official names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, mode: str = "joint",
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, n, D] -> [B, n, D]; with rows int64 [B, M]: only those rows of the output,
        [B, M, D] (the other rows still serve as keys and values; rows do not mix after the
        attention, so these are exactly the full block's rows)."""
        if rows is None:
            x = x + self.attn(self.norm1(x), grid, mode)
        else:
            x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1])) + self.attn(self.norm1(x), grid, mode, rows)
        return x + self.mlp(self.norm2(x))


__all__ = ["Attention", "Block", "LN_EPS", "Mlp"]
