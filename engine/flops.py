"""Analytic matmul FLOPs of one EchoFM clip and MFU: the one place both are computed
(docs/mfu.md says which FLOPs count, the peak, and gives the ViT-L numbers; the trainer's
`mfu` metric and benchmarks/train.py both call `mfu` here).

Counts 2 * m * n * k for every matrix product the model runs, following model.py term by
term (the masked 75-90% of patches are never embedded, the encoder sees only visible
tokens plus its CLS, the decoder sees all tokens plus its CLS and predicts the removed ones). Norms, softmax, GELU and
the loss arithmetic are not matmuls and are left out. A training step is 3x the forward
(backward = 2x forward), the usual MFU convention.

`tests/test_flops.py` checks this against torch's FlopCounterMode on a real forward and
against the VideoMAE-B figure in docs/mfu.md (~71 GFLOPs forward per clip).
"""
from __future__ import annotations

from .losses import LossConfig
from .masking import MaskConfig, keep_count
from .model import ModelConfig

H200_BF16_PEAK = 790e12
"""Dense bf16 FLOP/s measured on an H200 (docs/mfu.md)."""

PEAK_BF16_TFLOPS = {"GH200": 989.0, "H200": H200_BF16_PEAK / 1e12, "H100": 989.0, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0, "3090": 71.0}
"""Dense bf16 peak TFLOP/s per device, by a substring of the device name (first match wins, so
"GH200" comes before "H200"): the H200 as measured on random data, the others vendor figures."""


def device_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the device called `name` (torch.cuda.get_device_name), or None."""
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def _block(n: int, d: int, hidden: int) -> int:
    """Linear layers of one ViT block on n rows: qkv, proj, fc1, fc2."""
    return 2 * n * (3 * d * d + d * d + 2 * d * hidden)


def _attn(groups: int, q_rows: int, k_rows: int, d: int) -> int:
    """Scores and weighted sum over all heads: 2 products of q_rows x k_rows x d per group."""
    return 4 * groups * q_rows * k_rows * d


def visible_layout(model_cfg: ModelConfig, mask_cfg: MaskConfig) -> tuple[int, tuple[int, int] | None]:
    """(visible tokens Nv, (T', K) when they form tubes else None) for this mask."""
    c = model_cfg.resolved()
    t, l = c.t_grid, c.l_grid
    if mask_cfg.ratio == 0.0:
        return t * l, (t, l)
    if mask_cfg.kind == "tube":
        k = keep_count(l, mask_cfg.ratio)
        return t * k, (t, k)
    if mask_cfg.kind == "random":
        return keep_count(t * l, mask_cfg.ratio), None
    return keep_count(t, mask_cfg.ratio) * l, None


def model_flops(model_cfg: ModelConfig, mask_cfg: MaskConfig | None = None, loss_cfg: LossConfig | None = None) -> dict:
    """Per-clip FLOPs at this mask and loss (defaults: MaskConfig(), LossConfig()):
    {"forward", "train_step" (= 3 x forward), "parts": {name: forward FLOPs}}."""
    mask_cfg, loss_cfg = mask_cfg or MaskConfig(), loss_cfg or LossConfig()
    prior_grid = loss_cfg.prior_grid if loss_cfg.phase_prior == "pixel" else 0  # "embed": no pixel prior
    c = model_cfg.resolved()
    d, dd = c.embed_dim, c.decoder_embed_dim
    hid, dhid = int(d * c.mlp_ratio), int(dd * c.mlp_ratio)
    t, l = c.t_grid, c.l_grid
    n = t * l
    nv, grid = visible_layout(c, mask_cfg)
    parts: dict[str, int] = {"patch_embed": 2 * nv * c.patch_dim * d}

    # Encoder: [CLS, visible tokens] (no CLS without cls_embed).
    rows = nv + int(c.cls_embed)
    enc = 0
    for i in range(c.depth):
        enc += _block(rows, d, hid)
        if c.attention == "divided" and grid is not None:
            tg, k = grid
            enc += _attn(tg, k, k, d) if i % 2 == 0 else _attn(k, tg, tg, d)
            enc += _attn(1, 1, rows, d)  # the CLS row over everything
        else:
            enc += _attn(1, rows, rows, d)
    parts["encoder"] = enc

    # Phase projector: tubes: q, k, v of the one slice CLS, k and v of every token, the CLS
    # queries only; padded slices: qkv on every [slice CLS, slice positions] row, CLS query
    # only. Then only the T' CLS rows go through proj and the MLP.
    if grid is not None:
        k = grid[1]
        qkv = 2 * 3 * d * d + 2 * t * k * 2 * d * d
        att = _attn(t, 1, k + 1, d)
    else:
        qkv = 2 * t * (l + 1) * 3 * d * d
        att = _attn(t, 1, l + 1, d)
    parts["phase"] = qkv + att + 2 * t * (d * d + 2 * d * hid)

    # Decoder: embed visible, [CLS, all tokens] through the blocks; the last block's queries,
    # proj and MLP, the norm and the prediction on the m removed tokens only (the loss's rows).
    m = n - nv
    parts["decoder_embed"] = 2 * nv * d * dd
    last = 2 * (n + 1) * 3 * dd * dd + _attn(1, m, n + 1, dd) + 2 * m * (dd * dd + 2 * dd * dhid)
    parts["decoder"] = (c.decoder_depth - 1) * (_block(n + 1, dd, dhid) + _attn(1, n + 1, n + 1, dd)) + last
    parts["decoder_pred"] = 2 * m * dd * c.pred_dim
    # Loss products: phase self-similarity and the pixel prior (tiny).
    parts["loss"] = 2 * t * t * d + 2 * t * t * prior_grid * prior_grid
    fwd = sum(parts.values())
    return {"forward": fwd, "train_step": 3 * fwd, "parts": parts}


def mfu(train_flops_per_clip: float, clips_per_s: float, peak_flops: float = H200_BF16_PEAK,
        devices: int = 1) -> float:
    """Model FLOPs utilisation (docs/mfu.md): train-step FLOPs per clip (`model_flops(...)
    ["train_step"]`) x clips per second trained on `devices` devices together / (their dense
    bf16 peak, each `peak_flops`, x devices)."""
    return train_flops_per_clip * clips_per_s / (peak_flops * devices)
