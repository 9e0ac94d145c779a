"""Collapse monitor of the phase branch: cheap figures from tensors the loss already has.

The periodic objective can be lowered without learning the cycle: the per-slice phase
embeddings become a template of slice positions, the same for every clip (docs/fidelity.md
measures it for the `official` variant). Three figures tell a healthy branch from that:

- `phase_slice_share`: the share of the clips' within-clip phase-embedding variance that
  the slice index alone explains across the batch. Each clip's embeddings are centred over
  its slices (the component all slices share says nothing about phase); the share is
  B * sum_t ||mean_b c[b, t]||^2 / sum_{b,t} ||c[b, t]||^2. A template (the same per-slice
  vectors for every clip) gives 1; clips whose embeddings follow their own cycle (each its
  own phase and period) give about 1 / B.
- `phase_s_spread`: the standard deviation of S's off-diagonal entries (mean over clips);
  near 0 when every slice looks alike to S (raw cosines saturated at ~1).
- `phase_sp_corr`: Pearson r of S with the cycle prior P over the off-diagonal pairs (mean
  over clips): how far S follows the beats that P sees in the pixels.

Plus `phase_s_mean` (S's off-diagonal mean). All are floats, computed on one micro-batch
(the last of the logged step, on each rank its own) in float64 on the CPU: [B, T', D] and
two [B, T', T'] tensors, no extra forward.

Threshold (`COLLAPSE`), from the measured runs in docs/fidelity.md (benchmarks/ablation.py
on the demo corpus, echofm_tiny, batch 4; medians over the second half of each run's logged
steps): `official` (collapsed) 0.96-0.995, already 0.90 at step 10; `centred` (healthy)
0.26, single readings 0.15-0.40 (1 / B = 0.25 for independent clips); reconstruction only
(an untrained phase projector) 0.56-0.61, single readings up to 0.73. A share above 0.9 is
called a collapse.
"""
from __future__ import annotations

import torch

COLLAPSE = {"phase_slice_share": 0.9}
"""A figure above its threshold means the phase branch has collapsed to a template."""


def _offdiag(b: int, t: int, device) -> torch.Tensor:
    return ~torch.eye(t, dtype=torch.bool, device=device).expand(b, t, t)


def slice_share(phase: torch.Tensor) -> float:
    """phase [B, T', D] -> the share of within-clip variance explained by the slice index
    (1 for a template; ~1 / B for clips with independent phases; 0 for constant clips)."""
    c = phase.detach().double().cpu()
    c = c - c.mean(1, keepdim=True)  # [B, T', D]: each clip's own slice deviations
    total = c.pow(2).sum()
    if total <= 0:
        return 0.0
    return float(c.shape[0] * c.mean(0).pow(2).sum() / total)


def sp_correlation(sim: torch.Tensor, prior: torch.Tensor) -> float:
    """Mean over clips of Pearson r between S and P [B, T', T'] over the pairs j != i
    (a clip where either is constant counts as 0)."""
    s, p = sim.detach().double().cpu(), prior.detach().double().cpu()
    b, t, _ = s.shape
    off = _offdiag(b, t, s.device)
    s, p = s[off].view(b, -1), p[off].view(b, -1)
    s, p = s - s.mean(1, keepdim=True), p - p.mean(1, keepdim=True)
    den = (s.pow(2).sum(1) * p.pow(2).sum(1)).sqrt()
    r = torch.where(den > 0, (s * p).sum(1) / den.clamp(min=1e-300), 0.0)
    return float(r.mean())


def health(phase: torch.Tensor, sim: torch.Tensor, prior: torch.Tensor | None) -> dict[str, float]:
    """The monitor's figures (module docstring) of one batch: phase [B, T', D], sim / prior
    [B, T', T'] (prior None: no phase_sp_corr)."""
    s = sim.detach().double().cpu()
    b, t, _ = s.shape
    off = s[_offdiag(b, t, s.device)].view(b, -1)
    out = {"phase_slice_share": slice_share(phase), "phase_s_spread": float(off.std(1, unbiased=False).mean()),
           "phase_s_mean": float(off.mean())}
    if prior is not None:
        out["phase_sp_corr"] = sp_correlation(s, prior)
    return out


def from_output(out: dict | None) -> dict[str, float]:
    """`health` of a pretraining forward's output ("phase", "sim", "prior"); {} for outputs
    without a phase branch (fine-tunes) or a skipped step."""
    if not out or out.get("phase") is None or out.get("sim") is None:
        return {}
    return health(out["phase"], out["sim"], out.get("prior"))


def collapsed(figures: dict[str, float]) -> bool:
    """Whether any figure is past its `COLLAPSE` threshold."""
    return any(figures.get(k, 0.0) > v for k, v in COLLAPSE.items())


def warning(step: int, figures: dict[str, float]) -> str | None:
    """One line when the branch has collapsed, else None."""
    if not collapsed(figures):
        return None
    return (f"[echofm] warning: step {step}: the phase branch has collapsed to a slice-position template "
            f"(slice-index share {figures['phase_slice_share']:.3f} > {COLLAPSE['phase_slice_share']}, "
            f"r(S, P) {figures.get('phase_sp_corr', float('nan')):.2f}): it is not learning the cycle; "
            "loss.variant=centred avoids it (docs/fidelity.md)")


def figure_note(figures: dict[str, float]) -> str:
    """The similarity figure's caption: this batch's figures and what healthy looks like."""
    if not figures:
        return ""
    state = "COLLAPSED" if collapsed(figures) else "healthy"
    return (f"{state}: r(S, P) {figures.get('phase_sp_corr', float('nan')):.2f}, slice share "
            f"{figures['phase_slice_share']:.2f}, S spread {figures['phase_s_spread']:.2f}.  Healthy: S repeats "
            "P's beat bands (r near 1), different per clip (share near 1/B); collapsed: S the same "
            "slice-position pattern for every clip (share near 1)")
