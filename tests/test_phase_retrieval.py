"""Cycle-phase retrieval (engine/downstream/phase.py) on constructed embeddings whose answer
is known: phase, candidate rule (another beat only), centring, chance, paired difference."""
import numpy as np
import pytest
import torch

from echofm.engine.downstream.phase import (Slices, circular_distance, paired_difference, phase_retrieval,
                                            pixel_slices, retrieve, slice_phase)


def _slices(emb, time, period, video="v", patient=None):
    n = len(time)
    time = np.asarray(time, float)
    return Slices(emb=np.asarray(emb, float), phase=(time % period) / period, time=time,
                  period=np.full(n, float(period)), video=np.asarray(video if not isinstance(video, str) else [video] * n,
                                                                      dtype=object),
                  patient=np.asarray(patient or ["p"] * n, dtype=object))


def test_circular_distance_wraps():
    assert circular_distance(np.array([0.05, 0.9, 0.25]), np.array([0.95, 0.1, 0.75])).tolist() == pytest.approx(
        [0.1, 0.2, 0.5])


def test_slice_phase_is_the_circular_mean_of_its_frames():
    ph, t = slice_phase(torch.tensor([0, 1, 2, 3, 7, 8]), ed=0, period=4, tubelet=2)
    # frames 0,1 -> phases 0, .25; 2,3 -> .5, .75; 7,8 -> .75, 0 (across the wrap: .875)
    assert ph.tolist() == pytest.approx([0.125, 0.625, 0.875], abs=1e-9)
    assert t.tolist() == [0.5, 2.5, 7.5]
    ph, _ = slice_phase(np.array([5, 6]), ed=5, period=10, tubelet=2)
    assert ph.tolist() == pytest.approx([0.05])


def test_cycle_labels_are_read_in_stored_frames_on_folded_shards():
    """Regression: the labels count source frames, frames_index stored ones; on shards with the
    stride folded in (stored frame i = source frame 2i) the same instants must get the same
    phase as on unfolded shards."""
    from echofm.engine.downstream.phase import _cycle

    labels = {"labels": {"period_true": 20.0, "ed_true": [6]}}
    plain, folded = _cycle(labels), _cycle({**labels, "stride_folded": 2})
    assert plain == (20.0, 6.0) and folded == (10.0, 3.0)
    src = torch.tensor([6, 8, 10, 12])  # source frames, stride 2
    a, _ = slice_phase(src, ed=plain[1], period=plain[0], tubelet=2)
    b, _ = slice_phase(src // 2, ed=folded[1], period=folded[0], tubelet=2)
    assert a.tolist() == pytest.approx(b.tolist())
    assert _cycle({"labels": {"period_true": 20.0}}) is None


def test_phase_on_the_circle_retrieves_exactly_and_offsets_cancel():
    t = np.arange(32)
    phase = (t % 8) / 8
    emb = np.stack([np.cos(2 * np.pi * phase), np.sin(2 * np.pi * phase)], 1) + np.array([5.0, -3.0])
    res = phase_retrieval(_slices(emb, t, 8), bootstrap=50)
    assert res["error"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert res["hit_rate"]["value"] == 1.0
    assert res["queries"] == 32
    # chance over the candidates (everything >= 4 frames away) of phases on a uniform grid
    assert 0.2 < res["chance_error"]["value"] < 0.3


def test_hand_case_retrieves_the_opposite_phase():
    # period 20, slices at t = 0, 10, 20, 30 -> phases 0, .5, 0, .5; every other slice is a
    # candidate; the embeddings (mean 0) make each slice's nearest one of opposite phase.
    emb = [[1, 0], [0.6, 0.8], [-1, 0], [-0.6, -0.8]]
    rows, err, chance = retrieve(_slices(emb, [0, 10, 20, 30], 20))
    assert rows.tolist() == [0, 1, 2, 3]
    assert err.tolist() == [0.5, 0.5, 0.5, 0.5]
    assert chance.tolist() == pytest.approx([1 / 3] * 4)
    res = phase_retrieval(_slices(emb, [0, 10, 20, 30], 20), bootstrap=0)
    assert res["hit_rate"]["value"] == 0.0 and res["error"]["value"] == 0.5


def test_same_beat_and_other_videos_are_never_candidates():
    # slice 1 is a copy of slice 0 but only 2 frames later (period 20): not another beat, so
    # slice 0 must match slice 2; slice 3 (another video, also a copy) is never a candidate.
    emb = [[1, 0], [1, 0], [-1, 0.1], [1, 0]]
    s = _slices(emb, [0, 2, 12, 0], 20, video=["a", "a", "a", "b"])
    rows, err, _ = retrieve(s)
    assert rows.tolist() == [0, 1, 2]  # video b has one slice: no candidate, no query
    assert err[0] == pytest.approx(0.4)  # phase 0 vs 12/20 = 0.6 -> 0.4


def test_paired_difference_is_exact_on_constant_errors():
    # two videos (two patients) of the hand case: 'good' retrieves every phase exactly
    # (error 0), 'bad' always the opposite one (error 0.5): the difference is 0.5 in every resample.
    t, video, pats = [0, 10, 20, 30] * 2, ["a"] * 4 + ["b"] * 4, ["p1"] * 4 + ["p2"] * 4
    good = [[1, 0], [-1, 0], [1, 0], [-1, 0]] * 2
    bad = [[1, 0], [0.6, 0.8], [-1, 0], [-0.6, -0.8]] * 2
    a = phase_retrieval(_slices(good, t, 20, video=video, patient=pats), bootstrap=20)
    b = phase_retrieval(_slices(bad, t, 20, video=video, patient=pats), bootstrap=20)
    assert a["error"]["value"] == 0.0 and b["error"]["value"] == 0.5
    d = paired_difference(a, b, bootstrap=50)
    assert (d["value"], d["ci_low"], d["ci_high"]) == pytest.approx((-0.5, -0.5, -0.5))  # a - b
    with pytest.raises(ValueError, match="different queries"):
        paired_difference(a, phase_retrieval(_slices(good[:4], t[:4], 20, patient=pats[:4]), bootstrap=0))


def test_pixel_slices_pool_grey_frames_and_tubelets():
    v = torch.zeros(1, 4, 16, 16, 3, dtype=torch.uint8)
    v[0, 0, :8, :8] = 255  # frame 0: top-left block white
    v[0, 1] = 51           # frame 1: uniform 0.2
    out = pixel_slices(v, tubelet=2, pool=8)
    assert out.shape == (1, 2, 4)
    assert out[0, 0].tolist() == pytest.approx([0.6, 0.1, 0.1, 0.1])
    assert out[0, 1].tolist() == [0.0] * 4
