"""The corpus plan: what `make_corpus` will write, as one `ClipSpec` per clip (no pixels).

Patients hold one or more studies (exams); a study holds clips of different views with one
EF and one valve grade; a later study of the same patient has its own EF (a follow-up
exam), the same grade and LV size. Splits are by patient. Every draw comes from
`SynthConfig.seed`, so the plan (and the corpus) is a function of the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VIEWS = ("A4C", "A2C", "PLAX", "PSAX")
CONTAINERS = ("mp4", "avi", "dcm")
FOLLOW_UP_EF = 10.0
"""A later study's EF differs from the patient's first by up to this many points."""
HEART_SCALE, EF_COUPLING = 1.3, 1.0
"""Defaults of the EF-signal knobs, calibrated with benchmarks/supervised_ref.py
(benchmarks/results/supervised_ref.json): with them EF is learnable from the pixels of the
demo's ~100 training clips, without them it was not."""


@dataclass(kw_only=True, slots=True)
class SynthConfig:
    """What `make_corpus` generates. Ranges are inclusive; all draws derive from `seed`."""

    videos: int = 200
    """Number of clips to write."""
    seed: int = 0
    """Master seed: the same seed gives byte-identical labels, masks and (mp4/avi/dcm) files."""
    min_size: int = 160
    """Smallest frame height in pixels (rounded to even)."""
    max_size: int = 320
    """Largest frame height in pixels; width = height x 1.05-1.35 (landscape, even)."""
    min_frames: int = 40
    """Shortest regular clip (frames)."""
    max_frames: int = 120
    """Longest clip (frames); periods are capped below it so every clip holds a full cycle."""
    short_fraction: float = 0.1
    """Fraction of clips shorter than 32 frames (each still holds one full cycle + 1 frame)."""
    min_period: int = 15
    """Shortest cardiac period in frames."""
    max_period: int = 45
    """Longest cardiac period in frames."""
    min_fps: int = 25
    """Lowest frame rate; the fps is drawn so that the heart rate stays 40-160 bpm."""
    max_fps: int = 60
    """Highest frame rate."""
    min_ef: float = 15.0
    """Lowest ejection fraction (percent)."""
    max_ef: float = 75.0
    """Highest ejection fraction (percent)."""
    max_views_per_study: int = 3
    """Each study has 1..this many clips, each of a different view (one EF and grade)."""
    max_studies_per_patient: int = 2
    """Each patient has 1..this many studies (the first corpus patient has two when allowed)."""
    avi_fraction: float = 0.2
    """Fraction of clips written as AVI/MJPEG."""
    dicom_fraction: float = 0.05
    """Fraction of clips written as multi-frame DICOM (the rest are MP4/H.264)."""
    val_fraction: float = 0.15
    """Fraction of patients in the val split."""
    test_fraction: float = 0.15
    """Fraction of patients in the test split."""
    nuisance: float = 1.0
    """Scale of the per-clip acquisition variation (probe tilt up to +-11 deg, depth zoom
    0.85-1.08, shift, gain, time-gain compensation, contrast, speckle and noise level), as
    between real scans; 0 gives every clip the same pose and settings."""
    heart_scale: float = HEART_SCALE
    """Size of the heart in the fan: the scene is zoomed by this about the heart's upper
    middle (1.3: the LV cavity fills ~13% of the fan at ED, the apex near the probe and the
    atria reaching the fan's far edge, as in real apical views; 1.0: ~8%)."""
    ef_coupling: float = EF_COUPLING
    """How much the atria, RV, valve excursion and wall thickening follow the LV's stroke
    (1: in proportion to the LV's area change, as in a real heart, where a weak LV moves
    less blood through every chamber; 0: they move the same at every EF, which leaves most
    of the moving pixels blind to EF)."""
    workers: int = 1
    """Processes that render and encode clips (1 = in this process)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.videos < 1:
            raise ValueError(f"videos must be >= 1, got {self.videos}")
        if not 64 <= self.min_size <= self.max_size:
            raise ValueError(f"need 64 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not 8 <= self.min_period <= self.max_period:
            raise ValueError(f"need 8 <= min_period <= max_period, got {self.min_period}, {self.max_period}")
        if self.min_frames > self.max_frames or self.max_frames <= self.min_period:
            raise ValueError("need min_frames <= max_frames and max_frames > min_period "
                             f"(got {self.min_frames}, {self.max_frames}, period {self.min_period})")
        if self.short_fraction > 0 and self.min_period > 30:
            raise ValueError("short clips (< 32 frames) need min_period <= 30 to hold one cycle")
        if not 1 <= self.min_fps <= self.max_fps:
            raise ValueError(f"need 1 <= min_fps <= max_fps, got {self.min_fps}, {self.max_fps}")
        if not 0.0 < self.min_ef <= self.max_ef < 95.0:
            raise ValueError(f"need 0 < min_ef <= max_ef < 95, got {self.min_ef}, {self.max_ef}")
        if not 1 <= self.max_views_per_study <= len(VIEWS):
            raise ValueError(f"max_views_per_study must be 1..{len(VIEWS)}, got {self.max_views_per_study}")
        if self.max_studies_per_patient < 1:
            raise ValueError(f"max_studies_per_patient must be >= 1, got {self.max_studies_per_patient}")
        for k in ("short_fraction", "avi_fraction", "dicom_fraction", "val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if self.avi_fraction + self.dicom_fraction > 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("avi+dicom fractions must be <= 1 and val+test fractions < 1")
        if not 0.0 <= self.nuisance <= 1.0:
            raise ValueError(f"nuisance must be in [0, 1], got {self.nuisance}")
        if not 0.8 <= self.heart_scale <= 1.4:  # larger: the LV no longer fits the fan at every pose
            raise ValueError(f"heart_scale must be in [0.8, 1.4], got {self.heart_scale}")
        if not 0.0 <= self.ef_coupling <= 1.0:
            raise ValueError(f"ef_coupling must be in [0, 1], got {self.ef_coupling}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(kw_only=True, slots=True, frozen=True)
class ClipSpec:
    """Everything that determines one clip (picklable; `render_clip` is a function of it)."""

    name: str
    """File stem, `<study>_<view>`."""
    patient: str
    view: str
    ef: float
    """Ejection fraction in percent (V = A**1.5 of the LV cavity mask area)."""
    grade: int
    """Valve disease grade 0/1/2."""
    period: int
    """Frames per cardiac cycle."""
    ed_offset: int
    """First end-diastole frame, in [0, period)."""
    systole: int
    """Frames from ED to ES."""
    fps: int
    frames: int
    height: int
    width: int
    container: str
    """'mp4' (H.264), 'avi' (MJPEG) or 'dcm' (multi-frame DICOM)."""
    split: str
    study: str = ""
    """Study (exam) id `s<seed>e<NNNN>`, numbered through the corpus (it does not contain
    the patient id); empty for a clip rendered outside a corpus."""
    lv_scale: float = 1.0
    """Per-patient LV size factor."""
    seed: int = 0
    """Seed of this clip's speckle, noise and pose jitter."""
    nuisance: float = 1.0
    """Scale of the acquisition variation drawn from `seed` (`SynthConfig.nuisance`)."""
    heart_scale: float = HEART_SCALE
    """Size of the heart in the fan (`SynthConfig.heart_scale`)."""
    ef_coupling: float = EF_COUPLING
    """How much the atria, RV, valves and wall thickening follow the LV's stroke
    (`SynthConfig.ef_coupling`)."""


def _stratified(n: int, fraction: float, offset: float) -> np.ndarray:
    """bool [n]: True for round(n * fraction) evenly spread indices (Bresenham)."""
    i = np.arange(n + 1)
    return np.diff(np.floor(i * fraction + offset)) > 0


def _draw_count(rng: np.random.Generator, weights: list[float], cap: int) -> int:
    """1..cap, drawn with `weights` (for 1, 2, ...) cut to the first `cap`."""
    w = np.array(weights[:cap])
    return 1 + int(rng.choice(len(w), p=w / w.sum()))


def study_layout(cfg: SynthConfig, rng: np.random.Generator) -> list[list[int]]:
    """Clips per study per patient, [[views of study 0, views of study 1, ...], ...],
    summing to cfg.videos. The first patient has two studies of two views when the
    limits allow, so every corpus holds a multi-view study and a multi-study patient."""
    layout: list[list[int]] = []
    left = cfg.videos
    while left > 0:
        if not layout:
            studies = [2] * min(2, cfg.max_studies_per_patient)
        else:
            studies = [_draw_count(rng, [3.0, 4.0, 3.0, 2.0], cfg.max_views_per_study)
                       for _ in range(_draw_count(rng, [3.0, 1.0, 0.5], cfg.max_studies_per_patient))]
        patient = []
        for views in studies:
            views = min(views, cfg.max_views_per_study, left)
            if views:
                patient.append(views)
                left -= views
        layout.append(patient)
    return layout


def _spread(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k of range(n), one from each of k equal runs (a random position within each run)."""
    return np.floor((np.arange(k) + rng.uniform(0.0, 1.0, k)) * n / k).astype(int)


def patient_splits(efs: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> list[str]:
    """Split of each patient (efs: float [P], first-study EF), stratified by EF: the test
    and val patients are spread over the EF range, so a small held-out split does not
    miss the low or high EFs by chance. At least one val and one test patient once there
    are three patients."""
    n_pat = len(efs)
    n_test = max(round(cfg.test_fraction * n_pat), int(cfg.test_fraction > 0)) if n_pat >= 3 else 0
    n_val = max(round(cfg.val_fraction * n_pat), int(cfg.val_fraction > 0)) if n_pat >= 3 else 0
    split = np.array(["train"] * n_pat, dtype=object)
    by_ef = np.argsort(efs, kind="stable")
    if n_test:
        split[by_ef[_spread(n_pat, n_test, rng)]] = "test"
    rest = by_ef[split[by_ef] == "train"]
    if n_val:
        split[rest[_spread(len(rest), n_val, rng)]] = "val"
    return [str(x) for x in split]


def clip_timing(cfg: SynthConfig, rng: np.random.Generator, short: bool) -> tuple[int, int, int]:
    """(period, frames, fps) of one clip; a short clip has < 32 frames, still > period."""
    if short:
        period = int(rng.integers(cfg.min_period, min(cfg.max_period, 30) + 1))
        frames = int(rng.integers(min(period + 1, 31), 32))
    else:
        period = int(rng.integers(cfg.min_period, min(cfg.max_period, cfg.max_frames - 1) + 1))
        frames = int(rng.integers(max(cfg.min_frames, period + 1), cfg.max_frames + 1))
    # fps such that the heart rate 60 * fps / period stays within 40-160 bpm
    lo = max(cfg.min_fps, math.ceil(period * 40 / 60))
    hi = max(lo, min(cfg.max_fps, math.floor(period * 160 / 60)))
    return period, frames, int(rng.integers(lo, hi + 1))


def plan_corpus(cfg: SynthConfig) -> list[ClipSpec]:
    """Draw every clip's parameters from `cfg.seed`; cheap (no rendering)."""
    cfg.validate()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5E7]))
    layout = study_layout(cfg, rng)
    n_pat, n = len(layout), cfg.videos
    grades = rng.permutation(np.resize(np.arange(3), n_pat))  # balanced grades
    efs = rng.uniform(cfg.min_ef, cfg.max_ef, n_pat)
    lv_scales = rng.uniform(0.92, 1.08, n_pat)
    splits = patient_splits(efs, cfg, rng)
    # containers and short clips spread evenly over the corpus (so small corpora get each)
    dcm = _stratified(n, cfg.dicom_fraction, 0.5)
    avi = _stratified(n, cfg.avi_fraction, 0.8) & ~dcm
    short = _stratified(n, cfg.short_fraction, 0.6)
    view_cursor = int(rng.integers(len(VIEWS)))
    specs: list[ClipSpec] = []
    for p, studies in enumerate(layout):
        patient = f"s{cfg.seed}p{p:04d}"
        for k, count in enumerate(studies):
            # its own counter, so that no study id holds a patient id in clear text
            study = f"s{cfg.seed}e{sum(map(len, layout[:p])) + k:04d}"
            ef = efs[p] if k == 0 else np.clip(efs[p] + rng.uniform(-FOLLOW_UP_EF, FOLLOW_UP_EF),
                                               cfg.min_ef, cfg.max_ef)
            for j in range(count):
                i = len(specs)
                view = VIEWS[(view_cursor + j) % len(VIEWS)]
                period, frames, fps = clip_timing(cfg, rng, bool(short[i]))
                height = 2 * int(rng.integers(cfg.min_size // 2, cfg.max_size // 2 + 1))
                specs.append(ClipSpec(
                    name=f"{study}_{view.lower()}", patient=patient, study=study, view=view,
                    ef=round(float(ef), 2), grade=int(grades[p]), period=period,
                    ed_offset=int(rng.integers(period)),
                    systole=max(2, round(period * rng.uniform(0.33, 0.4))), fps=fps, frames=frames,
                    height=height, width=2 * round(height * rng.uniform(1.05, 1.35) / 2),
                    container="dcm" if dcm[i] else "avi" if avi[i] else "mp4",
                    split=splits[p], lv_scale=float(lv_scales[p]), nuisance=cfg.nuisance,
                    heart_scale=cfg.heart_scale, ef_coupling=cfg.ef_coupling,
                    seed=int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0])))
            view_cursor += count
    return specs
