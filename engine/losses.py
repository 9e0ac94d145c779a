"""Losses: masked norm-pix reconstruction + the periodic-driven contrastive loss (DESIGN §4).

Periodic contrastive, per clip (T' temporal tokens, phase embeddings z_t [T', D]):

- S = cosine self-similarity of the phase embeddings [T', T'], after removing their
  temporal mean (as P does). Departure from a raw cosine, measured: the slices share one
  large component (the slice CLS), raw cosines sat at 0.99999 and the triplet hinge stayed
  at exactly the margin for 2,400 steps, because a cosine at its maximum has no gradient.
- P = cycle prior from pixels: grayscale, averaged over each token's tubelet frames and
  pooled to a coarse g x g grid, temporal mean removed (the static anatomy cancels, the
  beating part stays), cosine. Frames one cardiac period apart have P close to 1.
- Positives of anchor i: P[i, j] above the row mean (over j != i), j != i. Negatives:
  the rest, except temporal neighbours |i - j| <= 1 (adjacent tokens look alike for
  reasons other than the cycle phase).
- Triplet with the hardest positive (lowest S among positives) and the hardest negative
  (highest S among negatives): relu(S_an - S_ap + margin). Anchors without a positive
  or a negative are skipped through masks (no NaN, no host sync).
- Optional KL(softmax(P / tau) || softmax(S / tau)) over each row's other tokens.

Total = rec + contrastive_weight * contrastive + kl_weight * kl.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Reconstruction + periodic-driven contrastive (DESIGN §4)."""

    norm_pix: bool = True
    """Normalise each target patch by its own mean/std (MAE's norm-pix loss)."""
    contrastive_weight: float = 0.1
    """w_c in total = reconstruction + w_c * contrastive; 0 disables the term."""
    margin: float = 0.3
    """Triplet margin on cosine similarities."""
    kl_weight: float = 0.0
    """Optional KL(softmax(P) || softmax(S)) cycle term."""
    temperature: float = 0.1
    """Softmax temperature for the KL term."""
    prior_grid: int = 16
    """Side of the coarse spatial grid the cycle prior pools each frame to."""

    def validate(self) -> None:
        if self.contrastive_weight < 0 or self.kl_weight < 0:
            raise ValueError("contrastive_weight and kl_weight must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.prior_grid < 1:
            raise ValueError(f"prior_grid must be >= 1, got {self.prior_grid}")


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over removed patches only.

    pred, target [B, N, P] float; mask [B, N] (1 = removed). Returns (loss scalar, the
    target used: per-patch normalised when norm_pix). No removed patch -> loss 0.
    """
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0), target


@torch.no_grad()
def cycle_prior(video: torch.Tensor, t_grid: int, grid: int = 16) -> torch.Tensor:
    """Pixel-space cycle prior. video [B, T, H, W, C] uint8|float -> cosine [B, T', T'] float32."""
    b, t = video.shape[:2]
    x = video.float().mean(-1)  # grayscale [B, T, H, W]
    x = x.view(b, t_grid, t // t_grid, *x.shape[2:]).mean(2)  # per temporal token
    x = F.adaptive_avg_pool2d(x, (grid, grid)).flatten(2)  # [B, T', g*g]
    x = F.normalize(x - x.mean(1, keepdim=True), dim=-1)  # static content removed
    return x @ x.transpose(1, 2)


def phase_similarity(phase: torch.Tensor) -> torch.Tensor:
    """phase [B, T', D] -> cosine self-similarity S [B, T', T'] of the temporally centred
    embeddings (the shared per-clip component would otherwise pin every cosine near 1)."""
    z = F.normalize(phase - phase.mean(1, keepdim=True), dim=-1)
    return z @ z.transpose(1, 2)


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
    """Triplet loss with hardest positive / negative mined in `sim`.

    sim (with grad), prior [B, T', T']; valid bool [B, T'] (slices that exist; None = all).
    Returns (loss, fraction of usable anchors with a non-zero hinge).
    """
    pos, neg = triplet_sets(prior, valid)
    ok = pos.any(-1) & neg.any(-1)  # [B, T']
    s_ap = sim.masked_fill(~pos, float("inf")).amin(-1)
    s_an = sim.masked_fill(~neg, float("-inf")).amax(-1)
    s_ap, s_an = torch.where(ok, s_ap, 0.0), torch.where(ok, s_an, 0.0)
    hinge = F.relu(s_an - s_ap + margin) * ok
    n = ok.sum().clamp(min=1)
    return hinge.sum() / n, ((hinge > 0) & ok).sum().float() / n


def cycle_kl(sim: torch.Tensor, prior: torch.Tensor, temperature: float,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(softmax(P_i / tau) || softmax(S_i / tau)), over j != i."""
    cand = _candidates(prior, valid)
    logp = F.log_softmax((prior / temperature).masked_fill(~cand, -1e4), -1)
    logq = F.log_softmax((sim / temperature).masked_fill(~cand, -1e4), -1)
    kl = (logp.exp() * (logp - logq) * cand).sum(-1)
    ok = cand.any(-1)
    return (kl * ok).sum() / ok.sum().clamp(min=1)


def compute(cfg: LossConfig, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
            phase: torch.Tensor, prior: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """All terms. pred/target [B, N, P], mask [B, N], phase [B, T', D], prior [B, T', T'].

    Returns {"loss", "terms": {"rec", "contrastive", "kl", "active"} detached, "target"
    (as used), "sim" (detached), "prior"}. Every term is computed (also at weight 0) so
    every parameter stays in the graph for data-parallel gradient reduction.
    """
    rec, tgt = reconstruction_loss(pred, target, mask, cfg.norm_pix)
    sim = phase_similarity(phase)
    con, active = periodic_contrastive(sim, prior, cfg.margin, valid)
    loss = rec + cfg.contrastive_weight * con
    kl = torch.zeros((), device=pred.device)
    if cfg.kl_weight > 0:
        kl = cycle_kl(sim, prior, cfg.temperature, valid)
        loss = loss + cfg.kl_weight * kl
    terms = {"rec": rec.detach(), "contrastive": con.detach(), "kl": kl.detach(), "active": active.detach()}
    return {"loss": loss, "terms": terms, "target": tgt, "sim": sim.detach(), "prior": prior}
