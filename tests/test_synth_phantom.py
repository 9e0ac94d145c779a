"""The phantom's calibration knobs (heart size, EF coupling), its probe re-aiming and its
EF-stratified splits, checked on rendered pixels and masks (no files written)."""
import dataclasses

import numpy as np
import pytest

from echofm.loaders.synth import LV_CAVITY, LV_MYO, ClipSpec, SynthConfig, plan_corpus, render_clip, sector_mask
from echofm.loaders.synth.phantom import relative_stroke

BASE = ClipSpec(name="t", patient="t", view="A4C", ef=20.0, grade=1, period=16, ed_offset=2, systole=6, fps=30,
                frames=32, height=128, width=160, container="mp4", split="train", seed=4, nuisance=0.0)


def ef_from_masks(masks: np.ndarray) -> float:
    """The corpus's EF definition: V = A**1.5 of the LV cavity mask area."""
    v = (masks == LV_CAVITY).reshape(len(masks), -1).sum(1).astype(np.float64) ** 1.5
    return float(100.0 * (v.max() - v.min()) / v.max())


def moving_outside_lv(spec: ClipSpec) -> int:
    """Fan pixels outside the LV whose temporal std exceeds 40 grey levels."""
    c = render_clip(spec)
    lv = ((c.masks == LV_CAVITY) | (c.masks == LV_MYO)).any(0)
    return int(((c.video.astype(np.float32).std(0) > 40) & c.sector & ~lv).sum())


def test_relative_stroke():
    assert relative_stroke(60.0, 1.0) == pytest.approx(1.0)
    assert relative_stroke(20.0, 0.0) == relative_stroke(70.0, 0.0) == 1.0
    lo, mid, hi = (relative_stroke(ef, 1.0) for ef in (20.0, 45.0, 70.0))
    assert lo < 0.5 < mid < 1.0 < hi


@pytest.mark.parametrize("view", ["A4C", "PLAX"])
def test_ef_coupling_moves_atria_rv_and_valves(view):
    # outside the LV, a strong heart moves more pixels than a weak one only when coupled
    weak, strong = (moving_outside_lv(dataclasses.replace(BASE, view=view, ef=ef, ef_coupling=1.0))
                    for ef in (20.0, 70.0))
    assert strong > 1.5 * weak
    weak0, strong0 = (moving_outside_lv(dataclasses.replace(BASE, view=view, ef=ef, ef_coupling=0.0))
                      for ef in (20.0, 70.0))
    assert strong0 < 1.5 * weak0


def test_psax_shows_no_valve():
    # mid-papillary PSAX: the valve grade leaves the pixels unchanged
    clips = [render_clip(dataclasses.replace(BASE, view="PSAX", grade=g)) for g in (0, 2)]
    assert np.array_equal(clips[0].video, clips[1].video)


def test_heart_scale_zooms_the_lv():
    area = [(render_clip(dataclasses.replace(BASE, heart_scale=s)).masks[2] == LV_CAVITY).sum()
            for s in (1.0, 1.3)]
    assert area[1] / area[0] == pytest.approx(1.3 ** 2, rel=0.1)


def test_lv_inside_fan_at_every_pose():
    # full pose variation, narrow and wide frames, the default heart size: the probe is
    # re-aimed so the whole LV is imaged, and the EF from the masks matches the label
    cfg = SynthConfig(videos=24, seed=9, min_size=96, max_size=128, min_frames=24, max_frames=30,
                      short_fraction=0.0)
    for spec in plan_corpus(cfg):
        clip = render_clip(spec)
        inner = sector_mask(spec.height, spec.width, margin=-1.0)
        lv = (clip.masks[clip.ed[0]] == LV_CAVITY) | (clip.masks[clip.ed[0]] == LV_MYO)
        assert not (lv & ~inner).any(), spec.name
        assert abs(ef_from_masks(clip.masks) - spec.ef) < 1.0, spec.name


def test_splits_stratified_by_ef():
    # each patient's first-study EF: in EF order, the k test patients fall one in each of k
    # equal runs of patients (a random split would bunch them)
    specs = plan_corpus(SynthConfig(videos=300, seed=3, test_fraction=0.25))
    first = {}
    for c in specs:
        first.setdefault(c.patient, c)
    order = sorted(first.values(), key=lambda c: c.ef)
    ranks = [i for i, c in enumerate(order) if c.split == "test"]
    n, k = len(order), len(ranks)
    assert k == round(0.25 * n)
    assert all(j * n / k - 1 < r < (j + 1) * n / k for j, r in enumerate(ranks)), ranks
    ef = {s: np.mean([c.ef for c in order if c.split == s]) for s in ("train", "test")}
    assert abs(ef["test"] - ef["train"]) < 2.0
