"""Losses: masked (norm-pix) reconstruction + the periodic-driven contrastive loss (docs/fidelity.md).

One objective, the official EchoFM code's (SekeunKim/EchoFM `MaskedAutoencoderViT.forward`):

    total = rec + triplet_weight * triplet + cycle_weight * cycle

- rec: mean over a patch of the squared error, averaged over the removed patches; the
  target is per-patch normalised when `norm_pix` (MAE's norm-pix loss).
- P (the cycle prior, `phase_prior="pixel"`): grayscale (mean over channels), averaged
  over each temporal token's frames, pooled to `prior_grid` x `prior_grid`, each frame's
  spatial mean removed (global brightness flicker cancels), then `prior_center_alpha` x the
  temporal mean removed (the static anatomy cancels, the beating part stays), L2
  normalised, cosine. Frames one cardiac period apart have P close to 1.
  `phase_prior="embed"` uses S itself (detached) instead.
- S: cosine self-similarity of the per-slice phase embeddings z_t [T', D] (`variant`).
- triplet: positives of anchor i are the j != i with P[i, j] above the row mean of P over
  j != i; negatives are the rest minus temporal neighbours |i - j| <= 1. Hardest positive
  (lowest S) and hardest negative (highest S): relu(S_an - S_ap + margin), averaged over
  anchors that have both (zero, in the graph, when none has).
- cycle: KL(softmax(P_i / tau) || softmax(S_i / tau)) over j != i, summed over j, averaged
  over all rows.

Variants (`LossConfig.variant`), each named where it departs from the official code:

- `official`: S = raw cosine of z_t: the official loss to float64 precision, gradients
  included (tests/test_fidelity.py; side by side with the official code: <= 3e-16).
- `centred`: S = cosine of z_t - mean_t z_t, removing the component all slices share
  (as P's temporal centring does); the pretraining recipes' and the demo's objective.
  With raw cosines the embeddings keep a large shared component, S stays near 1 and the
  loss is lowered by a content-free template of slice positions that does not follow the
  cycle; centred S learns it (docs/fidelity.md has the measurements; the collapse monitor,
  engine/phase_health.py, tells the two apart during training). Its normalisation is
  guarded: ||c|| becomes sqrt(||c||^2 + (centre_eps * rms||z||)^2), which bounds the
  gradient (otherwise 1 / ||c||) when the slices are nearly equal.

Non-tube masks (random / frame) can leave slices without visible tokens: `valid` [B, T']
drops them as anchors and as candidates (the official code has tube masks only, where
every slice is valid and `valid=None` gives its numbers exactly).

Precision: everything runs in the inputs' dtype (float64 in, float64 out); half precision
is computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

VARIANTS = ("official", "centred")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The EchoFM objective; defaults are the official code's (paper-faithful) values.

    Field names follow the official `model_args` keys (norm_pix <- norm_pix_loss). The
    recipes set `variant: centred` explicitly; the default stays `official` because a
    config without the key is an official checkpoint or a version-1 export, both trained
    with raw-cosine S."""

    variant: Literal["official", "centred"] = "official"
    """How S is computed: official (raw cosine) or centred (see the module docstring)."""
    norm_pix: bool = True
    """Per-patch normalised reconstruction target (the paper and the official README
    command; the official class default, used when a checkpoint does not say, is off)."""
    triplet_weight: float = 1.0
    """Weight of the hard-mined triplet term (official 1.0)."""
    triplet_margin: float = 0.2
    """Triplet margin on cosine similarities (official 0.2)."""
    cycle_weight: float = 1.0
    """Weight of the cycle KL term (official 1.0; 0 keeps it computed but unweighted)."""
    cycle_tau: float = 0.1
    """Softmax temperature of the cycle KL (official 0.1)."""
    phase_prior: Literal["pixel", "embed"] = "pixel"
    """Where positives / negatives come from: the pixel cycle prior, or S itself (detached)."""
    prior_center_alpha: float = 1.0
    """Fraction of the temporal mean removed from the pixel prior (official 1.0)."""
    prior_grid: int = 32
    """Side of the grid each frame is pooled to for the pixel prior (official 32)."""
    centre_eps: float = 1.0e-3
    """`centred` only: gradient guard, relative to the embeddings' rms norm."""

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.triplet_weight < 0 or self.cycle_weight < 0:
            raise ValueError("triplet_weight and cycle_weight must be >= 0")
        if self.cycle_tau <= 0:
            raise ValueError(f"cycle_tau must be > 0, got {self.cycle_tau}")
        if self.prior_grid < 1:
            raise ValueError(f"prior_grid must be >= 1, got {self.prior_grid}")
        if self.centre_eps <= 0:
            raise ValueError(f"centre_eps must be > 0, got {self.centre_eps}")


def work_dtype(x: torch.Tensor) -> torch.Tensor:
    """Integer or half tensors -> float32; float32 / float64 unchanged (never a downcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                        norm_pix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over removed patches only.

    pred, target [B, M, P] float; mask [B, M] (1 = removed), or None when pred / target
    hold only removed patches (what EchoFM.forward passes: the loss needs nothing else).
    Returns (loss scalar, the target used: per-patch normalised when norm_pix). No removed
    patch -> loss 0.
    """
    if norm_pix:
        target = norm_pix_target(target)
    if mask is None:  # every patch counts: the mean over patches of a patch's mean is one fused mean
        return (F.mse_loss(pred, target) if pred.numel() else pred.sum()), target
    per_patch = (pred - target).pow(2).mean(-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0), target


def norm_pix_target(target: torch.Tensor, eps: float = 1.0e-6) -> torch.Tensor:
    """[..., P] -> (x - mean) / sqrt(unbiased var + eps) per patch (MAE's norm-pix target).

    As one layer_norm (biased var): with var_u = var * P / (P - 1) the expression equals
    sqrt((P - 1) / P) * (x - mean) / sqrt(var + eps * (P - 1) / P), the same number up to
    rounding in one pass over the patch (Tensor.var alone took 10x longer on CPU)."""
    p = target.shape[-1]
    k = (p - 1) / p
    return F.layer_norm(target, (p,), weight=target.new_full((p,), k ** 0.5), eps=eps * k)


@torch.no_grad()
def cycle_prior(video: torch.Tensor, t_grid: int, grid: int = 32, alpha: float = 1.0) -> torch.Tensor:
    """Pixel-space cycle prior. video [B, T, H, W, C] uint8|float -> cosine P [B, T', T']
    (float32, or the video's dtype when it is float32 / float64)."""
    x = _token_frames(video, t_grid)  # [B, T', H, W]: grey level of each temporal token (up to a scale)
    x = F.adaptive_avg_pool2d(x, (grid, grid)).flatten(2)  # [B, T', g*g]
    x = x - x.mean(-1, keepdim=True)  # each frame's brightness
    x = F.normalize(x - alpha * x.mean(1, keepdim=True), dim=-1)  # static content
    return torch.bmm(x, x.transpose(1, 2))


def _token_frames(video: torch.Tensor, t_grid: int) -> torch.Tensor:
    """[B, T, H, W, C] -> [B, T', H, W]: the mean over channels and over each temporal
    token's frames, float; uint8: their sum instead (the prior is a cosine of centred
    values, so the constant 1 / (t C) changes nothing), summed exactly in int16 (at most
    128 values of 255) and converted once: 2x faster on CPU than converting the clip."""
    b, t, h, w, c = video.shape
    per = t // t_grid
    if video.dtype != torch.uint8 or per * c > 128:
        return work_dtype(video).mean(-1).view(b, t_grid, per, h, w).mean(2)
    x = video.reshape(b, t_grid, per, h * w * c)
    acc = x[:, :, 0].to(torch.int16)
    for i in range(1, per):
        acc += x[:, :, i]
    # the channel sum as one mat-vec (sums of integers below 2^24 are exact in float32)
    return (acc.view(-1, c).float() @ torch.ones(c, device=video.device)).view(b, t_grid, h, w)


def phase_similarity(phase: torch.Tensor, variant: str = "official", eps: float = 1.0e-3) -> torch.Tensor:
    """phase [B, T', D] -> S [B, T', T']: cosine of the embeddings (official) or of the
    temporally centred embeddings with a guarded norm (centred)."""
    if variant == "official":
        z = F.normalize(phase, dim=-1)
    elif variant == "centred":
        c = phase - phase.mean(1, keepdim=True)
        rms = phase.detach().pow(2).sum(-1).mean(1).sqrt()[:, None, None]  # [B, 1, 1]
        z = c / (c.pow(2).sum(-1, keepdim=True) + (eps * rms) ** 2).sqrt()
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return torch.bmm(z, z.transpose(1, 2))


def _candidates(prior: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """bool [B, T', T']: pairs (i, j), j != i, both slices valid."""
    b, t, _ = prior.shape
    eye = torch.eye(t, dtype=torch.bool, device=prior.device)
    cand = ~eye.expand(b, t, t)
    if valid is not None:
        cand = cand & valid[:, :, None] & valid[:, None, :]
    return cand


def triplet_sets(prior: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives / negatives from the prior. prior [B, T', T'] -> (pos, neg) bool [B, T', T']."""
    t = prior.shape[-1]
    cand = _candidates(prior, valid)
    row_mean = (prior * cand).sum(-1) / cand.sum(-1).clamp(min=1)
    above = prior > row_mean.unsqueeze(-1)
    idx = torch.arange(t, device=prior.device)
    far = (idx[None, :] - idx[:, None]).abs() > 1
    return above & cand, ~above & cand & far


def periodic_contrastive(sim: torch.Tensor, prior: torch.Tensor, margin: float,
                         valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplet loss with the hardest positive / negative mined in `sim`.

    sim (with grad), prior [B, T', T']; valid bool [B, T'] (slices that exist; None = all).
    Returns (loss, fraction of usable anchors with a non-zero hinge). Indices are picked
    with argmin / argmax (first on ties, as the official code) and gathered, so gradients
    match too. No usable anchor: 0 with a graph, no NaN, no host sync.
    """
    pos, neg = triplet_sets(prior, valid)
    ok = pos.any(-1) & neg.any(-1)  # [B, T']
    i_ap = sim.masked_fill(~pos, float("inf")).argmin(-1, keepdim=True)
    i_an = sim.masked_fill(~neg, float("-inf")).argmax(-1, keepdim=True)
    hinge = F.relu(sim.gather(-1, i_an) - sim.gather(-1, i_ap) + margin).squeeze(-1)
    hinge = torch.where(ok, hinge, 0.0)
    n = ok.sum().clamp(min=1)
    return hinge.sum() / n, ((hinge > 0) & ok).sum().to(sim.dtype) / n


def cycle_kl(sim: torch.Tensor, prior: torch.Tensor, tau: float,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(softmax(P_i / tau) || softmax(S_i / tau)) over j != i."""
    cand = _candidates(prior, valid)
    low = torch.finfo(sim.dtype).min  # finite stand-in for -inf: no NaN in forward or backward
    logq = F.log_softmax((prior / tau).masked_fill(~cand, low), -1)
    logp = F.log_softmax((sim / tau).masked_fill(~cand, low), -1)
    kl = torch.where(cand, logq.exp() * (logq - logp), 0.0).sum(-1)  # [B, T']
    ok = cand.any(-1)
    return (kl * ok).sum() / ok.sum().clamp(min=1)


def compute(cfg: LossConfig, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
            phase: torch.Tensor, prior: torch.Tensor | None, valid: torch.Tensor | None = None) -> dict:
    """All terms. pred/target [B, M, P], mask [B, M] (None: every row is a removed patch),
    phase [B, T', D], prior [B, T', T'] (None with phase_prior="embed": S detached is used).

    Returns {"loss", "terms": {"rec", "triplet", "cycle", "active"} detached, "target"
    (as used), "sim" (detached), "prior"}. Every term is computed (also at weight 0) so
    every parameter stays in the graph for data-parallel gradient reduction.
    """
    rec, tgt = reconstruction_loss(pred, target, mask, cfg.norm_pix)
    sim = phase_similarity(phase, cfg.variant, cfg.centre_eps)
    if prior is None or cfg.phase_prior == "embed":
        prior = sim.detach()
    prior = prior.to(sim.dtype)
    cyc = cycle_kl(sim, prior, cfg.cycle_tau, valid)
    trip, active = periodic_contrastive(sim, prior, cfg.triplet_margin, valid)
    loss = rec + cfg.triplet_weight * trip + cfg.cycle_weight * cyc
    terms = {"rec": rec.detach(), "triplet": trip.detach(), "cycle": cyc.detach(), "active": active.detach()}
    return {"loss": loss, "terms": terms, "target": tgt, "sim": sim.detach(), "prior": prior}
