"""Losses: masked norm-pix MSE and the periodic-driven contrastive loss vs float64 loop references."""
import math

import pytest
import torch

from echofm.engine.losses import (LossConfig, compute, cycle_kl, cycle_prior, periodic_contrastive,
                                  phase_similarity, reconstruction_loss, triplet_sets)


def _ref_triplet(sim, prior, margin):
    """Direct transcription of DESIGN §4, one anchor at a time."""
    total, count = 0.0, 0
    for b in range(sim.shape[0]):
        t = sim.shape[1]
        for i in range(t):
            others = [j for j in range(t) if j != i]
            mean = sum(prior[b, i, j].item() for j in others) / len(others)
            pos = [j for j in others if prior[b, i, j] > mean]
            neg = [j for j in others if prior[b, i, j] <= mean and abs(i - j) > 1]
            if not pos or not neg:
                continue
            ap = min(sim[b, i, j].item() for j in pos)
            an = max(sim[b, i, j].item() for j in neg)
            total += max(0.0, an - ap + margin)
            count += 1
    return total / max(count, 1)


def _ref_kl(sim, prior, tau):
    vals = []
    for b in range(sim.shape[0]):
        t = sim.shape[1]
        for i in range(t):
            idx = [j for j in range(t) if j != i]
            p = torch.softmax(prior[b, i, idx] / tau, 0)
            q = torch.softmax(sim[b, i, idx] / tau, 0)
            vals.append((p * (p.log() - q.log())).sum().item())
    return sum(vals) / len(vals)


def test_reconstruction_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 10, 12, generator=g, dtype=torch.float64)
    target = torch.randn(2, 10, 12, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 10, generator=g) > 0.5).double()
    loss, tgt = reconstruction_loss(pred, target, mask, norm_pix=True)
    ref_t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    ref = sum(((pred[b, n] - ref_t[b, n]) ** 2).mean() for b in range(2) for n in range(10) if mask[b, n]) / mask.sum()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(tgt, ref_t)
    # visible patches do not count
    pred2 = pred + (1 - mask)[..., None] * 100
    torch.testing.assert_close(reconstruction_loss(pred2, target, mask)[0], loss)
    raw, _ = reconstruction_loss(pred, target, mask, norm_pix=False)
    torch.testing.assert_close(raw, ((pred - target) ** 2).mean(-1).mul(mask).sum() / mask.sum())
    # nothing masked: 0, not NaN
    assert reconstruction_loss(pred, target, torch.zeros(2, 10))[0] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_and_kl_match_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    phase = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    feats = torch.nn.functional.normalize(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), dim=-1)
    prior = feats @ feats.transpose(1, 2)
    sim = phase_similarity(phase)
    loss, active = periodic_contrastive(sim, prior, margin=0.3)
    assert math.isclose(loss.item(), _ref_triplet(sim, prior, 0.3), rel_tol=1e-9, abs_tol=1e-12)
    assert 0 <= active.item() <= 1
    kl = cycle_kl(sim, prior, 0.1)
    assert math.isclose(kl.item(), _ref_kl(sim, prior, 0.1), rel_tol=1e-7)


def test_contrastive_is_zero_when_embeddings_follow_the_prior_and_skips_empty_rows():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 4, generator=g, dtype=torch.float64), dim=-1)
    prior = feats @ feats.transpose(1, 2)
    assert periodic_contrastive(prior, prior, margin=0.0)[0] == 0
    assert periodic_contrastive(-prior, prior, margin=0.0)[0] > 0
    # a static clip: prior all zero -> no positives -> loss 0 and finite gradients
    phase = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    static = torch.zeros(2, 8, 8, dtype=torch.float64)
    loss, active = periodic_contrastive(phase_similarity(phase), static, 0.3)
    loss.backward()
    assert loss == 0 and active == 0 and torch.isfinite(phase.grad).all()
    # invalid slices are neither anchors nor candidates
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[:, 4:] = False
    sim = phase_similarity(phase.detach())
    a = periodic_contrastive(sim, prior, 0.3, valid)[0]
    b = periodic_contrastive(sim[:, :4, :4], prior[:, :4, :4], 0.3)[0]
    torch.testing.assert_close(a, b)


def _disk_clip(period, frames=24, size=32):
    """uint8 [1, T, H, W, 3]: a bright disk whose radius pulses with `period` frames."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r0 = torch.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
    out = []
    for f in range(frames):
        rad = size * (0.22 + 0.12 * math.sin(2 * math.pi * f / period))
        out.append((r0 < rad).to(torch.uint8) * 200 + 20)
    return torch.stack(out)[None, ..., None].expand(-1, -1, -1, -1, 3).contiguous()


@pytest.mark.parametrize("period,tubelet", [(8, 2), (6, 2), (12, 4)])
def test_cycle_prior_marks_one_period_apart_as_positive(period, tubelet):
    video = _disk_clip(period)
    t_grid = video.shape[1] // tubelet
    k = period // tubelet  # tokens per period
    prior = cycle_prior(video, t_grid, grid=8)
    pos, neg = triplet_sets(prior)
    for i in range(t_grid):
        for j in (i - k, i + k):
            if 0 <= j < t_grid:
                assert pos[0, i, j], (i, j)
                assert prior[0, i, j] > 0.99
                # and one period apart is as similar as anything else in the row
                others = prior[0, i].masked_fill(torch.arange(t_grid) == i, -2)
                assert prior[0, i, j] >= others.max() - 1e-6
    if k % 2 == 0:  # half a period apart: opposite phase, a negative
        assert all(neg[0, i, i + k // 2] for i in range(t_grid - k // 2))


def test_cycle_prior_on_the_synthetic_phantom():
    from echofm.loaders import synth

    spec = synth.ClipSpec(name="p_A4C", patient="p", view="A4C", ef=55.0, grade=0, period=8, ed_offset=1,
                          systole=3, fps=30, frames=32, height=112, width=112, container="avi", split="train",
                          seed=1)
    video = torch.from_numpy(synth.render_clip(spec).video)[None, ..., None].expand(-1, -1, -1, -1, 3)
    prior = cycle_prior(video, 16, grid=16)
    pos, _ = triplet_sets(prior)
    assert all(pos[0, i, i + 4] and pos[0, i + 4, i] for i in range(12))


def test_compute_returns_each_term_and_the_weighted_total():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    phase = torch.randn(2, 6, 8, generator=g)
    feats = torch.nn.functional.normalize(torch.randn(2, 6, 3, generator=g), dim=-1)
    prior = feats @ feats.transpose(1, 2)
    cfg = LossConfig(contrastive_weight=0.5, kl_weight=0.25)
    out = compute(cfg, pred, target, mask, phase, prior)
    t = out["terms"]
    torch.testing.assert_close(out["loss"], t["rec"] + 0.5 * t["contrastive"] + 0.25 * t["kl"])
    assert t["kl"] > 0 and out["sim"].shape == (2, 6, 6)
    with pytest.raises(ValueError):
        LossConfig(temperature=0).validate()


def test_phase_similarity_ignores_the_shared_component():
    """Regression: raw cosines of phase embeddings with a large shared part sat at ~1 and
    gave the triplet hinge no gradient (loss stuck at the margin). S must see only the
    per-slice deviations, and the loss must push on them."""
    g = torch.Generator().manual_seed(0)
    t, d = 8, 16
    dev = torch.randn(1, t, d, generator=g, dtype=torch.float64)
    shared = 1.0e3 * torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    s_big = phase_similarity(shared + dev)
    s_dev = phase_similarity(dev)
    assert torch.allclose(s_big, s_dev, atol=1e-9)
    phase = (shared + dev).requires_grad_()
    prior = phase_similarity(torch.randn(1, t, d, generator=g, dtype=torch.float64))
    loss, _ = periodic_contrastive(phase_similarity(phase), prior, 0.3)
    loss.backward()
    assert loss.item() > 0 and phase.grad.norm() > 1e-3
