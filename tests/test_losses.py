"""Losses: masked norm-pix MSE, the pixel cycle prior, the triplet and cycle KL terms (both
variants) against float64 loop references (tests/official_reference.py) and by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from echofm.engine.losses import (LossConfig, compute, cycle_kl, cycle_prior, periodic_contrastive,
                                  phase_similarity, reconstruction_loss, triplet_sets)
from official_reference import official_cycle, official_prior, official_triplet


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


def test_triplet_by_hand():
    """One anchor worked out: prior row 0 = [1, .9, -.5, .8, -.2] -> mean over j != 0 is 0.25,
    positives {1, 3}, negatives {2, 4} (|i - j| > 1); S row 0 = [1, .5, .6, .4, .1] ->
    hardest positive .4, hardest negative .6, hinge relu(.6 - .4 + .2) = .4."""
    prior = torch.eye(5, dtype=torch.float64)[None].clone()
    prior[0, 0] = torch.tensor([1, 0.9, -0.5, 0.8, -0.2], dtype=torch.float64)
    sim = torch.eye(5, dtype=torch.float64)[None].clone()
    sim[0, 0] = torch.tensor([1, 0.5, 0.6, 0.4, 0.1], dtype=torch.float64)
    valid = torch.ones(1, 5, dtype=torch.bool)
    pos, neg = triplet_sets(prior, valid)
    assert pos[0, 0].tolist() == [False, True, False, True, False]
    assert neg[0, 0].tolist() == [False, False, True, False, True]
    # rows 1..4 of an identity prior: mean 0 over j != i, nothing above it -> no positives
    loss, active = periodic_contrastive(sim, prior, 0.2)
    assert loss.item() == pytest.approx(0.4) and active.item() == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["official", "centred"])
def test_triplet_and_cycle_match_loop_references(seed, variant):
    g = torch.Generator().manual_seed(seed)
    phase = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    feats = F.normalize(torch.randn(3, 7, 5, generator=g, dtype=torch.float64), dim=-1)
    prior = feats @ feats.transpose(1, 2)
    sim = phase_similarity(phase, variant)
    loss, active = periodic_contrastive(sim, prior, margin=0.2)
    ref, ref_active = official_triplet(sim, prior, 0.2)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-12) and active.item() == pytest.approx(ref_active.item())
    assert math.isclose(cycle_kl(sim, prior, 0.1).item(), official_cycle(sim, prior, 0.1).item(), rel_tol=1e-12)


def test_phase_similarity_variants():
    g = torch.Generator().manual_seed(0)
    phase = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    z = F.normalize(phase, dim=-1)
    torch.testing.assert_close(phase_similarity(phase, "official"), z @ z.transpose(1, 2), rtol=0, atol=1e-15)
    c = F.normalize(phase - phase.mean(1, keepdim=True), dim=-1)
    # well-separated slices: the guard changes the centred cosine by < 1e-5
    torch.testing.assert_close(phase_similarity(phase, "centred"), c @ c.transpose(1, 2), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="variant"):
        phase_similarity(phase, "raw")


def test_centred_similarity_ignores_the_shared_component():
    """Regression (the measured saturation): with a large shared part the raw cosines sit at
    ~1 and the triplet hinge gets almost no gradient; centred S sees only the per-slice
    deviations and the loss pushes on them."""
    g = torch.Generator().manual_seed(0)
    t, d = 8, 16
    dev = torch.randn(1, t, d, generator=g, dtype=torch.float64)
    shared = 1.0e3 * torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    assert phase_similarity(shared + dev, "official").min() > 0.9999
    torch.testing.assert_close(phase_similarity(10 * shared / 1e3 + dev, "centred"), phase_similarity(dev, "centred"),
                               rtol=0, atol=1e-3)
    prior = phase_similarity(torch.randn(1, t, d, generator=g, dtype=torch.float64), "centred")
    grads = {}
    for variant in ("official", "centred"):
        phase = (shared + dev).requires_grad_()
        loss, _ = periodic_contrastive(phase_similarity(phase, variant), prior, 0.2)
        loss.backward()
        grads[variant] = phase.grad.norm().item()
    assert grads["centred"] > 1e3 * grads["official"], grads


def test_centred_gradient_is_bounded_when_slices_are_nearly_equal():
    """Unguarded, d(c / ||c||) / dc = 1 / ||c|| explodes as the slices' embeddings meet; the
    guard caps it at 1 / (eps * rms||z||): ||grad|| <= 2 sqrt(T) ||W|| / (eps * rms||z||)."""
    g = torch.Generator().manual_seed(0)
    t, d, eps = 8, 16, 1e-3
    base = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    phase0 = base + 1e-9 * torch.randn(1, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(1, t, t, generator=g, dtype=torch.float64)
    norms = {}
    for name, e in (("guarded", eps), ("unguarded", 1e-300)):
        phase = phase0.clone().requires_grad_()
        (phase_similarity(phase, "centred", e) * w).sum().backward()
        norms[name] = phase.grad.norm().item()
    bound = 2 * math.sqrt(t) * w.norm().item() / (eps * base.norm().item())
    assert norms["guarded"] <= bound and math.isfinite(norms["guarded"])
    assert norms["unguarded"] > 1e4 * norms["guarded"], norms


def test_no_usable_anchor_gives_zero_with_a_graph_and_invalid_slices_drop_out():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2, 8, 4, generator=g, dtype=torch.float64), dim=-1)
    prior = feats @ feats.transpose(1, 2)
    assert periodic_contrastive(prior, prior, margin=0.0)[0] == 0
    assert periodic_contrastive(-prior, prior, margin=0.0)[0] > 0
    # a static clip: prior all zero -> no positives -> loss 0 and finite (zero) gradients
    phase = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    static = torch.zeros(2, 8, 8, dtype=torch.float64)
    loss, active = periodic_contrastive(phase_similarity(phase), static, 0.2)
    loss.backward()
    assert loss == 0 and active == 0 and torch.equal(phase.grad, torch.zeros_like(phase))
    # invalid slices are neither anchors nor candidates
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[:, 4:] = False
    sim = phase_similarity(phase.detach())
    a = periodic_contrastive(sim, prior, 0.2, valid)[0]
    b = periodic_contrastive(sim[:, :4, :4], prior[:, :4, :4], 0.2)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(cycle_kl(sim, prior, 0.1, valid), cycle_kl(sim[:, :4, :4], prior[:, :4, :4], 0.1))


def _disk_clip(period, frames=24, size=32, flicker=0.0):
    """uint8 [1, T, H, W, 3]: a bright disk whose radius pulses with `period` frames (and a
    global brightness flicker of `flicker` grey levels at another period)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r0 = torch.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
    out = []
    for f in range(frames):
        rad = size * (0.22 + 0.12 * math.sin(2 * math.pi * f / period))
        out.append((r0 < rad).float() * 180 + 40 + flicker * math.sin(2 * math.pi * f / 5.3))
    return torch.stack(out).round().to(torch.uint8)[None, ..., None].expand(-1, -1, -1, -1, 3).contiguous()


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
                others = prior[0, i].masked_fill(torch.arange(t_grid) == i, -2)
                assert prior[0, i, j] >= others.max() - 1e-6
    if k % 2 == 0:  # half a period apart: opposite phase, a negative
        assert all(neg[0, i, i + k // 2] for i in range(t_grid - k // 2))


def test_cycle_prior_equals_the_official_prior_and_ignores_flicker():
    """float64 [0, 1] input gives the official prior exactly; removing each frame's spatial
    mean makes a global brightness flicker irrelevant (the prior without that step is not)."""
    video = _disk_clip(8, flicker=30.0).double() / 255
    imgs = video.permute(0, 4, 1, 2, 3)
    for alpha in (1.0, 0.5):
        got = cycle_prior(video, 12, grid=32, alpha=alpha)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, official_prior(imgs, 12, alpha), rtol=0, atol=1e-14)
    steady = cycle_prior(_disk_clip(8).double() / 255, 12, grid=32)
    assert (cycle_prior(video, 12, grid=32) - steady).abs().max() < 0.02
    x = F.adaptive_avg_pool2d(video.mean(-1).view(1, 12, 2, 32, 32).mean(2), 32).flatten(2)
    no_spatial = F.normalize(x - x.mean(1, keepdim=True), dim=-1)
    assert (no_spatial @ no_spatial.transpose(1, 2) - steady).abs().max() > 0.1


def test_cycle_prior_on_the_synthetic_phantom():
    from echofm.loaders import synth

    spec = synth.ClipSpec(name="p_A4C", patient="p", view="A4C", ef=55.0, grade=0, period=8, ed_offset=1,
                          systole=3, fps=30, frames=32, height=112, width=112, container="avi", split="train",
                          seed=1)
    video = torch.from_numpy(synth.render_clip(spec).video)[None, ..., None].expand(-1, -1, -1, -1, 3)
    prior = cycle_prior(video, 16)
    pos, _ = triplet_sets(prior)
    assert all(pos[0, i, i + 4] and pos[0, i + 4, i] for i in range(12))


def test_compute_returns_each_term_and_the_weighted_total():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    phase = torch.randn(2, 6, 8, generator=g)
    feats = F.normalize(torch.randn(2, 6, 3, generator=g), dim=-1)
    prior = feats @ feats.transpose(1, 2)
    cfg = LossConfig(triplet_weight=0.5, cycle_weight=0.25)
    out = compute(cfg, pred, target, mask, phase, prior)
    t = out["terms"]
    assert set(t) == {"rec", "triplet", "cycle", "active"}
    torch.testing.assert_close(out["loss"], t["rec"] + 0.5 * t["triplet"] + 0.25 * t["cycle"])
    sim = phase_similarity(phase)
    torch.testing.assert_close(t["triplet"], periodic_contrastive(sim, prior, 0.2)[0])
    torch.testing.assert_close(t["cycle"], cycle_kl(sim, prior, 0.1))
    assert t["cycle"] > 0 and out["sim"].shape == (2, 6, 6)
    # phase_prior "embed": the prior is S itself, so the cycle KL is 0
    embed = compute(LossConfig(phase_prior="embed"), pred, target, mask, phase, None)
    assert embed["terms"]["cycle"].abs() < 1e-6 and torch.equal(embed["prior"], embed["sim"])


def test_defaults_are_the_official_settings_and_validation_names_the_field():
    c = LossConfig()
    assert (c.variant, c.norm_pix, c.triplet_weight, c.triplet_margin, c.cycle_weight, c.cycle_tau, c.phase_prior,
            c.prior_center_alpha, c.prior_grid) == ("official", True, 1.0, 0.2, 1.0, 0.1, "pixel", 1.0, 32)
    for bad, field in ((dict(cycle_tau=0), "cycle_tau"), (dict(variant="raw"), "variant"),
                       (dict(triplet_weight=-1), "triplet_weight"), (dict(prior_grid=0), "prior_grid")):
        with pytest.raises(ValueError, match=field):
            LossConfig(**bad).validate()
