"""Synthetic echo corpus: ground truth recomputed from the generator's own written output."""
import csv
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pydicom
import pytest

from echofm.engine.cli import main
from echofm.loaders.synth import (LABEL_COLUMNS, VIEWS, ClipSpec, SynthConfig, cycle, make_corpus,
                                  plan_corpus, read_labels, render_clip, write_dicom)
from echofm.loaders.synth.plan import FOLLOW_UP_EF


@pytest.fixture(scope="module")
def rows(synth_corpus):
    return read_labels(synth_corpus / "labels.csv")


def lv_area(masks: np.ndarray) -> np.ndarray:
    """LV cavity pixel count per frame, float64 [F]."""
    return (masks == 1).reshape(len(masks), -1).sum(1).astype(np.float64)


def measured_period(area: np.ndarray, min_lag: int = 8, min_overlap: int = 8) -> int:
    """Smallest lag whose mean squared difference a[t + L] - a[t] is ~0 relative to the
    signal variance (the first autocorrelation peak of an exactly periodic signal)."""
    a = area - area.mean()
    max_lag = len(a) - min_overlap
    scores = np.array([np.mean((a[lag:] - a[:-lag]) ** 2) for lag in range(min_lag, max_lag + 1)])
    scores /= a.var()
    near_zero = np.flatnonzero(scores < 0.02)
    assert len(near_zero), f"no period found, best score {scores.min():.3f}"
    first = near_zero[0]
    # walk to the bottom of that dip (the true lag minimises the difference)
    while first + 1 < len(scores) and scores[first + 1] < scores[first]:
        first += 1
    return int(first + min_lag)


def test_labels_columns_and_coverage(synth_corpus, rows):
    with open(synth_corpus / "labels.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == LABEL_COLUMNS
    assert {r["view"] for r in rows} == set(VIEWS)
    assert {r["grade"] for r in rows} == {0, 1, 2}
    assert {Path(r["file"]).suffix for r in rows} == {".mp4", ".avi", ".dcm"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert any(r["frames"] < 32 for r in rows)
    for r in rows:
        assert 15 <= r["ef"] <= 75 and 15 <= r["period"] <= 45 and 25 <= r["fps"] <= 60
        assert r["frames"] > r["period"], "every clip holds a full cycle"


def test_patients_and_studies(rows):
    per_patient, per_study = defaultdict(list), defaultdict(list)
    for r in rows:
        per_patient[r["patient"]].append(r)
        per_study[r["study"]].append(r)
    # the corpus holds a multi-view study and a multi-study patient (study-level pooling is testable)
    assert any(len(v) >= 2 for v in per_study.values())
    assert any(len({c["study"] for c in v}) >= 2 for v in per_patient.values())
    for patient, clips in per_patient.items():
        # one split and one grade per patient; study ids never contain the patient id
        assert len({(c["split"], c["grade"]) for c in clips}) == 1, patient
        assert not any(patient in c["study"] for c in clips), patient
    for study, clips in per_study.items():
        # one EF per study, distinct views, file names <study>_<view>
        assert len({c["ef"] for c in clips}) == 1, study
        assert len({c["view"] for c in clips}) == len(clips), study
        assert all(Path(c["file"]).stem == f"{study}_{c['view'].lower()}" for c in clips)


def test_plan_studies():
    # a larger plan (no rendering): every study size and follow-up EF rule, deterministic ids
    cfg = SynthConfig(videos=120, seed=7, max_views_per_study=3, max_studies_per_patient=3)
    specs = plan_corpus(cfg)
    assert len(specs) == 120 and [s.name for s in specs] == [s.name for s in plan_corpus(cfg)]
    studies = defaultdict(list)
    for s in specs:
        studies[s.study].append(s)
    assert {len(v) for v in studies.values()} == {1, 2, 3}
    studies_of = defaultdict(list)  # patient -> study ids in order
    for s in specs:
        if s.study not in studies_of[s.patient]:
            studies_of[s.patient].append(s.study)
    assert {len(v) for v in studies_of.values()} == {1, 2, 3}
    first = {s.patient: s.ef for s in specs if s.study == studies_of[s.patient][0]}
    follow_ups = [s for s in specs if s.study != studies_of[s.patient][0]]
    assert all(abs(s.ef - first[s.patient]) <= FOLLOW_UP_EF + 0.01 for s in follow_ups)
    assert any(s.ef != first[s.patient] for s in follow_ups)
    one = plan_corpus(SynthConfig(videos=30, seed=7, max_views_per_study=1, max_studies_per_patient=1))
    assert len({s.study for s in one}) == len({s.patient for s in one}) == 30


def test_dicom_study_uid(tmp_path):
    video = np.zeros((2, 16, 16), np.uint8)
    for name, study in (("a", "s1e0000"), ("b", "s1e0000"), ("c", "s1e0001")):
        write_dicom(tmp_path / f"{name}.dcm", video, fps=30, patient="p0", study=study, name=name, seed=1)
    uid = {n: pydicom.dcmread(tmp_path / f"{n}.dcm").StudyInstanceUID for n in "abc"}
    assert uid["a"] == uid["b"] != uid["c"]


def test_ef_and_ed_es_from_masks(synth_corpus, rows):
    for r in rows:
        masks = np.load(synth_corpus / r["mask"])
        assert masks.dtype == np.uint8 and masks.shape[0] == r["frames"]
        assert set(np.unique(masks)) <= {0, 1, 2, 3}
        area = lv_area(masks)
        vol = area ** 1.5  # documented volume definition V = A^1.5
        ef = 100.0 * (vol.max() - vol.min()) / vol.max()
        assert abs(ef - r["ef"]) < 2.0, (r["file"], ef, r["ef"])
        # ED = maximal LV area, ES = minimal (1-2 pixel ties between neighbouring frames)
        assert r["ed"] and r["es"]
        assert area[r["ed"]].min() >= area.max() - 2, r["file"]
        assert area[r["es"]].max() <= area.min() + 2, r["file"]
        assert np.diff(r["ed"]).tolist() == [r["period"]] * (len(r["ed"]) - 1)
        # EF is visible as area change: the LV shrinks by (1 - EF)^(2/3) in area
        assert area.min() / area.max() == pytest.approx((1 - r["ef"] / 100) ** (2 / 3), abs=0.02)
        if r["view"] != "PSAX":
            assert (masks == 3).any(), f"{r['file']}: LA missing"


def test_period_from_mask_area():
    # render-only clips (no encoding) long enough for two cycles, every period range covered
    cfg = SynthConfig(videos=12, seed=11, min_size=96, max_size=112, min_frames=56,
                      max_frames=100, short_fraction=0.0)
    specs = plan_corpus(cfg)
    assert {s.period for s in specs} & set(range(15, 25)) and {s.period for s in specs} & set(range(35, 46))
    for spec in specs:
        clip = render_clip(spec)
        assert abs(measured_period(lv_area(clip.masks)) - spec.period) <= 1, spec.name


def test_period_on_written_corpus(synth_corpus, rows):
    long_enough = [r for r in rows if r["frames"] >= r["period"] + 10]
    assert len(long_enough) >= len(rows) // 2
    for r in long_enough:
        area = lv_area(np.load(synth_corpus / r["mask"]))
        assert abs(measured_period(area) - r["period"]) <= 1, r["file"]


def layout(masks: np.ndarray) -> dict:
    """Coarse mask layout at ED-ish frame 0: LA presence, LV centroid, and the LV's
    principal axes (pose-independent: clips are tilted by up to 11 degrees)."""
    m = masks[0]
    ys, xs = np.nonzero(m == 1)
    h, w = m.shape
    evals, evecs = np.linalg.eigh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    major = evecs[:, 1]
    return {"la": bool((m == 3).any()), "cx": xs.mean() / w, "cy": ys.mean() / h,
            "elongation": float(np.sqrt(evals[1] / evals[0])),
            "tilt": float(np.degrees(np.arctan2(abs(major[0]), abs(major[1]))))}  # 0 = vertical


def test_views_differ(synth_corpus, rows):
    by_view = defaultdict(list)
    for r in rows:
        by_view[r["view"]].append(layout(np.load(synth_corpus / r["mask"])))
    for lay in by_view["PSAX"]:
        assert not lay["la"] and lay["elongation"] < 1.2  # a ring, no LA
    for lay in by_view["PLAX"]:
        assert lay["la"] and lay["elongation"] > 1.4 and lay["tilt"] > 55  # LV lies across the image
    for view in ("A4C", "A2C"):
        for lay in by_view[view]:
            assert lay["la"] and lay["elongation"] > 1.4 and lay["tilt"] < 25  # LV points up to the apex
    # without the per-scan pose variation: A4C LV right of the midline (RV on the left),
    # A2C LV on the midline
    spec = plan_corpus(SynthConfig(videos=8, seed=5, min_size=128, max_size=128, min_frames=40,
                                   max_frames=40, short_fraction=0, nuisance=0.0))
    clips = {s.name: (s, render_clip(s)) for s in spec}
    cx = defaultdict(list)
    for s, clip in clips.values():
        cx[s.view].append(layout(clip.masks)["cx"])
    assert min(cx["A4C"]) > max(cx["A2C"]) + 0.02
    # A4C draws four dark chambers, A2C two: compare dark area inside the fan at ED
    dark = {}
    for view in ("A4C", "A2C"):
        clip = next(c for s, c in clips.values() if s.view == view)
        f = clip.ed[0]
        dark[view] = ((clip.video[f] < 25) & clip.sector).sum() - (clip.masks[f] == 1).sum()
    assert dark["A4C"] > 1.5 * dark["A2C"]


def decode(path: Path) -> tuple[np.ndarray, float, str]:
    """Grey frames uint8 [F, H, W], fps and codec name of a corpus video."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        assert ds.PatientID and str(ds.PatientName)
        assert int(ds.NumberOfFrames) == len(ds.pixel_array)
        assert float(ds.FrameTime) == pytest.approx(1000.0 / float(ds.CineRate), rel=1e-3)
        return ds.pixel_array, float(ds.CineRate), "dicom"
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="gray") for f in c.decode(s)])
        return frames, float(s.average_rate), s.codec_context.name


def test_every_video_decodes_and_matches_masks(synth_corpus, rows):
    codecs = {".mp4": "h264", ".avi": "mjpeg", ".dcm": "dicom"}
    for r in rows:
        path = synth_corpus / r["file"]
        frames, fps, codec = decode(path)
        masks = np.load(synth_corpus / r["mask"])
        assert codec == codecs[path.suffix], r["file"]
        assert frames.shape == masks.shape and len(frames) == r["frames"], r["file"]
        assert fps == pytest.approx(r["fps"]), r["file"]
        # masks are aligned with the pixels: blood is dark, myocardium bright (medians:
        # valve leaflets inside the cavity are bright)
        cavity, myo = np.median(frames[masks == 1]), np.median(frames[masks == 2])
        assert cavity < 40 < myo and myo > 3 * cavity, (r["file"], cavity, myo)


def spec_for(view: str, grade: int = 1, **kw) -> ClipSpec:
    base = dict(name=f"t_{view}", patient="t", view=view, ef=50.0, grade=grade, period=20, ed_offset=3,
                systole=7, fps=30, frames=30, height=160, width=200, container="mp4", split="train", seed=9)
    base.update(kw)
    return ClipSpec(**base)


@pytest.mark.parametrize("view", VIEWS)
def test_text_and_ecg_outside_sector(view):
    clip = render_clip(spec_for(view))
    video, sector = clip.video, clip.sector
    assert not (clip.overlay & sector).any()
    assert not (clip.masks.any(0) & ~sector).any(), "chambers must lie inside the fan"
    h, w = sector.shape
    outside = video[:, ~sector]
    assert (outside.max(0) > 150).sum() > 50, "burned-in text / ECG trace present"
    changing = (video.max(0) != video.min(0))
    # outside the fan only the ECG cursor moves: inside the bottom band, a small area
    moving_out = changing & ~sector
    ys = np.nonzero(moving_out)[0]
    assert len(ys) and ys.min() > 0.87 * h and moving_out.sum() < 0.03 * h * w
    # inside the fan everything is live (speckle noise), so sector detection sees a fan
    assert changing[sector].mean() > 0.95
    # static overlay: text in the top corners, beside the apex
    text_rows = np.nonzero((video.min(0) > 150) & ~sector)[0]
    assert (text_rows < 0.2 * h).any()


def test_grade_changes_valves():
    bright = []
    for grade in (0, 1, 2):
        clip = render_clip(spec_for("A4C", grade=grade))
        bright.append(((clip.video > 200) & clip.sector[None]).sum())
    assert bright[0] < bright[1] < bright[2] and bright[2] > 2 * bright[0]


def test_cycle_ground_truth():
    c, mitral, aortic, ed, es = cycle(50, 20, 3, 7)
    assert ed == [3, 23, 43] and es == [10, 30]
    assert c[ed].tolist() == [1.0] * 3 and c[es].tolist() == [0.0] * 2
    assert (mitral[ed] == 0).all() and (aortic[es[0] + 1:es[0] + 10] == 0).all()


def test_seed_determinism(tmp_path):
    cfg = dict(videos=4, min_size=96, max_size=112, min_frames=24, max_frames=32, short_fraction=0.25,
               avi_fraction=0.25, dicom_fraction=0.25)
    make_corpus(tmp_path / "a", SynthConfig(seed=1, **cfg))
    make_corpus(tmp_path / "b", SynthConfig(seed=1, workers=2, **cfg))
    make_corpus(tmp_path / "c", SynthConfig(seed=2, **cfg))
    a, b, c = ((tmp_path / d / "labels.csv").read_bytes() for d in "abc")
    assert a == b and a != c
    for f in sorted((tmp_path / "a").rglob("*.*")):  # videos (all containers) and masks too
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f.name


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["synth", "--out", str(out), "--videos", "3", "--seed", "4", "--size", "96-100",
                 "--frames", "30-34", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 clips" in printed and "views:" in printed and str(out) in printed
    assert len(read_labels(out)) == 3
    assert main(["synth", "--out", str(out), "--size", "300-100"]) == 2
    assert "synth:" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="min_size"):
        SynthConfig(min_size=300, max_size=100).validate()
    with pytest.raises(ValueError, match="min_period"):
        SynthConfig(min_period=40, max_period=30).validate()
    with pytest.raises(ValueError, match="heart_scale"):
        SynthConfig(heart_scale=1.6).validate()
    with pytest.raises(ValueError, match="max_views_per_study"):
        SynthConfig(max_views_per_study=5).validate()
