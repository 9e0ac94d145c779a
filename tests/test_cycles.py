"""Cardiac cycle: period accuracy on synthetic clips with known periods, kernels vs numpy."""
import numpy as np

from echofm.loaders.cycles import estimate_cycle, gram, lag_profile, pooled_signal, top_components
from echofm.loaders.synth import VIEWS, ClipSpec, render_clip


def test_numba_kernels_match_numpy_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 20))
    c = x @ x.T
    np.testing.assert_allclose(gram(x), c, rtol=1e-12)
    ref = np.array([np.mean(np.diagonal(c, offset=lag)) for lag in range(11)])
    np.testing.assert_allclose(lag_profile(x, 10), ref, rtol=1e-12)
    # top principal components of a clearly rank-3 signal + noise vs numpy's eigh
    t = np.arange(30)[:, None]
    x = (np.hstack([5 * np.sin(t * 0.4), 3 * np.cos(t * 0.9), 2 * np.sin(t * 1.7)]) @ rng.standard_normal((3, 20))
         + 0.1 * rng.standard_normal((30, 20)))
    g = x @ x.T
    w, v = np.linalg.eigh(g)
    ref = v[:, ::-1][:, :3] * np.sqrt(w[::-1][:3])
    got = top_components(g, 3)
    np.testing.assert_allclose(np.abs(got), np.abs(ref), rtol=1e-6, atol=1e-6)


def test_period_within_one_frame_on_synthetic_clips():
    rng = np.random.default_rng(7)
    hits, n = 0, 0
    for i in range(24):
        period = int(rng.integers(12, 40))
        frames = int(rng.integers(2 * period, 2 * period + 30))  # two or more beats
        spec = ClipSpec(name=f"c{i}", patient=f"p{i}", view=VIEWS[i % 4], ef=float(rng.uniform(20, 70)),
                        grade=i % 3, period=period, ed_offset=int(rng.integers(0, period)),
                        systole=max(3, int(period * 0.35)), fps=30, frames=frames, height=72, width=80,
                        container="mp4", split="train", seed=i)
        r = render_clip(spec)
        cyc = estimate_cycle(np.repeat(r.video[..., None], 3, -1), fps=30.0)
        n += 1
        hits += cyc.period is not None and abs(cyc.period - period) <= 1.0
        if cyc.period is not None:  # ED/ES: one candidate per beat, spaced by the period
            assert len(cyc.ed) >= 2 and np.allclose(np.diff(cyc.ed), cyc.period, atol=1.01)
    assert hits / n >= 0.9, f"{hits}/{n} periods within 1 frame"


def test_no_periodicity_gives_none():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    c = estimate_cycle(noise, fps=30.0)
    assert c.period is None and c.ed == [] and c.es == []
    # a slow drift (one brightening ramp) is not a heartbeat either
    ramp = np.repeat((np.linspace(20, 200, 40)[:, None, None, None] + rng.normal(0, 3, (40, 32, 32, 1))).clip(0, 255)
                     .astype(np.uint8), 3, -1)
    assert estimate_cycle(ramp, fps=30.0).period is None


def test_pooled_signal_is_centred_and_normalised():
    frames = np.random.default_rng(2).integers(0, 255, (10, 40, 40, 3), dtype=np.uint8)
    x, bright = pooled_signal(frames, 8)
    assert x.shape == (10, 64) and bright.shape == (10,)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-9)
