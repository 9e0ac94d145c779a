"""The phase-branch collapse monitor (engine/phase_health.py) on embeddings with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from echofm.engine import phase_health
from echofm.engine.losses import phase_similarity


def _cyclic(b: int = 6, t: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings that follow each clip's own cycle (period and phase per clip), embedded in
    D dims by a random orthonormal pair, plus a large shared offset (what raw cosines see);
    and the prior P of that cycle, cos(2 pi (phi_i - phi_j))."""
    g = torch.Generator().manual_seed(seed)
    period = 3.0 + 3.0 * torch.rand(b, 1, generator=g, dtype=torch.float64)  # slices per beat
    phi = torch.arange(t, dtype=torch.float64)[None] / period + torch.rand(b, 1, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))[0]  # [D, 3]
    ang = 2 * math.pi * phi
    phase = torch.cos(ang)[..., None] * basis[:, 0] + torch.sin(ang)[..., None] * basis[:, 1] + 5.0 * basis[:, 2]
    prior = torch.cos(ang[:, :, None] - ang[:, None, :])
    return phase, prior


def test_template_reads_as_collapsed():
    phase, prior = _cyclic()
    template = phase[:1].expand_as(phase) + 0.0  # the same per-slice vectors for every clip
    h = phase_health.health(template, phase_similarity(template, "official"), prior)
    assert h["phase_slice_share"] == pytest.approx(1.0, abs=1e-12)
    assert phase_health.collapsed(h)
    line = phase_health.warning(120, h)
    assert line is not None and "\n" not in line and "step 120" in line and "1.000" in line
    assert "COLLAPSED" in phase_health.figure_note(h)


def test_cyclic_embeddings_read_as_healthy_and_follow_the_prior():
    phase, prior = _cyclic()
    sim = phase_similarity(phase, "centred")
    h = phase_health.health(phase, sim, prior)
    assert h["phase_sp_corr"] > 0.95  # centred S of a cycle is P up to the part-beat mean (0.97)
    assert h["phase_slice_share"] < 0.5  # own period and phase per clip: near 1 / B = 0.17
    assert not phase_health.collapsed(h) and phase_health.warning(5, h) is None
    # raw cosines of the same embeddings: the shared offset squeezes S towards 1
    raw = phase_health.health(phase, phase_similarity(phase, "official"), prior)
    assert raw["phase_s_mean"] > 0.9 and raw["phase_s_spread"] < 0.1 * h["phase_s_spread"]
    assert raw["phase_slice_share"] == pytest.approx(h["phase_slice_share"])  # a property of the embeddings


def test_slice_share_by_hand():
    # two clips, two slices, 1-D: c = [[-1, 1], [-1, 1]] -> share 1; [[-1, 1], [1, -1]] -> 0
    same = torch.tensor([[[0.0], [2.0]], [[3.0], [5.0]]])
    flip = torch.tensor([[[0.0], [2.0]], [[5.0], [3.0]]])
    assert phase_health.slice_share(same) == pytest.approx(1.0) and phase_health.slice_share(flip) == pytest.approx(0.0)
    assert phase_health.slice_share(torch.ones(3, 4, 2)) == 0.0  # no within-clip variance: no share


def test_sp_correlation_by_hand():
    prior = torch.tensor([[[1.0, 0.2, -0.5], [0.2, 1.0, 0.1], [-0.5, 0.1, 1.0]]])
    assert phase_health.sp_correlation(2 * prior - 0.3, prior) == pytest.approx(1.0)
    assert phase_health.sp_correlation(-prior, prior) == pytest.approx(-1.0)
    assert phase_health.sp_correlation(torch.ones(1, 3, 3), prior) == 0.0  # constant S: no correlation


def test_from_output_skips_outputs_without_a_phase_branch():
    assert phase_health.from_output(None) == {} and phase_health.from_output({"loss": torch.tensor(1.0)}) == {}
    phase, prior = _cyclic(b=2)
    h = phase_health.from_output({"phase": phase, "sim": phase_similarity(phase, "centred"), "prior": None})
    assert set(h) == {"phase_slice_share", "phase_s_spread", "phase_s_mean"}
