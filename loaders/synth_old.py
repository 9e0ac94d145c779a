"""Synthetic echocardiography corpus with exact ground truth (`echofm synth`).

Each clip is a phantom of one view (A4C, A2C, PLAX, PSAX) drawn inside a fan-shaped
ultrasound sector with speckle on a black background; burned-in text (top corners) and an
ECG trace with a moving cursor (a thin line in a band below the fan) lie outside the
sector, as on a scanner screen. Only chamber geometry, valve leaflets, the per-frame noise
and the ECG cursor change from frame to frame.

Ground truth, per clip:
- cardiac cycle: integer period P (frames) and ED offset; the cycle curve c(t) is exactly 1
  at end-diastole (ED, frames t = ed_offset + kP) and exactly 0 at end-systole (ES,
  `systole` frames after ED); the LV shrinks with 1 - c, the LA grows.
- EF: the LV cavity volume is defined from its mask area as V = A**1.5 (area-length family:
  similar shapes have V proportional to A^(3/2)), so EF = 100 * (1 - (A_es / A_ed)**1.5),
  which `ef_from_masks` recomputes from the written masks. The geometry is built so the
  analytic areas give the labelled EF exactly; rasterisation moves it by well under a point.
- masks: uint8 [F, H, W], 0 background, 1 LV cavity, 2 LV myocardium, 3 LA (CAMUS).
- valve grade 0/1/2 (none/mild/significant): leaflets get thicker, brighter and open less;
  grade 2 adds calcified nodules at the hinges.

Layout on disk: DIR/videos/NAME.{mp4,avi,dcm}, DIR/masks/NAME.npy, DIR/labels.csv with the
columns of `LABEL_COLUMNS`. Everything is a function of (config, seed): the clip seeds come
from `numpy.random.SeedSequence([seed, index])`, so worker count does not change output.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEWS = ("A4C", "A2C", "PLAX", "PSAX")
CONTAINERS = ("mp4", "avi", "dcm")
LABEL_COLUMNS = ("file", "patient", "view", "ef", "period", "ed", "es", "grade", "split",
                 "mask", "fps", "frames")
SPLITS = ("train", "val", "test")
LV_CAVITY, LV_MYO, LA = 1, 2, 3


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
    max_views_per_patient: int = 3
    """Each patient has 1..this many clips, each of a different view (same EF and grade)."""
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
    workers: int = 1
    """Processes that render and encode clips (1 = in this process)."""

    def validate(self) -> None:
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
        if not 1 <= self.max_views_per_patient <= len(VIEWS):
            raise ValueError(f"max_views_per_patient must be 1..{len(VIEWS)}")
        for k in ("short_fraction", "avi_fraction", "dicom_fraction", "val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if self.avi_fraction + self.dicom_fraction > 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("avi+dicom fractions must be <= 1 and val+test fractions < 1")
        if not 0.0 <= self.nuisance <= 1.0:
            raise ValueError(f"nuisance must be in [0, 1], got {self.nuisance}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(kw_only=True, slots=True, frozen=True)
class ClipSpec:
    """Everything that determines one clip (picklable; `render_clip` is a function of it)."""

    name: str
    """File stem, `<patient>_<view>`."""
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
    lv_scale: float = 1.0
    """Per-patient LV size factor."""
    seed: int = 0
    """Seed of this clip's speckle, noise and pose jitter."""
    nuisance: float = 1.0
    """Scale of the acquisition variation drawn from `seed` (`SynthConfig.nuisance`)."""


@dataclass(kw_only=True, slots=True)
class RenderedClip:
    """Output of `render_clip`."""

    video: np.ndarray
    """uint8 [F, H, W] grey frames."""
    masks: np.ndarray
    """uint8 [F, H, W] labels 0 bg, 1 LV cavity, 2 LV myocardium, 3 LA."""
    sector: np.ndarray
    """bool [H, W] the ultrasound fan (everything drawn live lies inside it)."""
    overlay: np.ndarray
    """bool [H, W] burned-in text + ECG trace pixels, static and all outside the fan (the ECG
    cursor dot moves along the trace, also outside)."""
    ed: list[int]
    """End-diastole frame indices (LV area maximal)."""
    es: list[int]
    """End-systole frame indices (LV area minimal)."""


# ---------------------------------------------------------------- ground-truth helpers


def lv_volume(area: np.ndarray | float) -> np.ndarray | float:
    """The corpus's LV volume definition from LV cavity area (pixels): V = A**1.5."""
    return np.asarray(area, dtype=np.float64) ** 1.5


def ef_from_masks(masks: np.ndarray) -> float:
    """EF (percent) from masks uint8 [F, H, W]: 100 * (EDV - ESV) / EDV, V = lv_volume(area)."""
    area = (masks == LV_CAVITY).reshape(len(masks), -1).sum(1)
    v = lv_volume(area)
    return float(100.0 * (v.max() - v.min()) / v.max())


def cycle(frames: int, period: int, ed_offset: int, systole: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], list[int]]:
    """Cycle curve c [F] float64 (1 at ED, 0 at ES), mitral / aortic opening [F] in [0, 1],
    and the ED and ES frame index lists."""
    k = (np.arange(frames) - ed_offset) % period  # frame within the cycle, 0 at ED
    dia = period - systole
    c = np.where(k <= systole, 0.5 * (1 + np.cos(np.pi * k / systole)),
                 0.5 * (1 - np.cos(np.pi * (k - systole) / dia)))
    mitral = np.where(k > systole, np.sin(np.pi * (k - systole) / dia), 0.0)  # opens in diastole
    aortic = np.where(k < systole, np.sin(np.pi * k / systole), 0.0)  # opens in systole
    ed = np.flatnonzero(k == 0).tolist()
    es = np.flatnonzero(k == systole).tolist()
    return c, mitral, aortic, ed, es


def sector_geometry(height: int, width: int) -> tuple[float, float, float, float]:
    """Fan apex (x, y), radius and half-angle (radians) for a frame of this size.

    The fan ends at 0.865 H or above, leaving the band below for the ECG; the top corners
    beside the apex hold the text. On narrow frames the radius shrinks so that the half-angle
    stays >= 35 degrees, which the chamber layouts need to lie inside the fan.
    """
    y0 = round(0.04 * height)
    radius = min(0.865 * height - y0, 0.46 * width / math.sin(math.radians(35.0)))
    half = min(math.radians(38.0), math.asin(min(1.0, 0.46 * width / radius)))
    return (width - 1) / 2.0, float(y0), radius, half


def sector_mask(height: int, width: int, margin: float = 0.0) -> np.ndarray:
    """bool [H, W] pixels inside the fan (grown by `margin` pixels)."""
    xc, y0, radius, half = sector_geometry(height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = x - xc, y - y0
    r = np.hypot(dx, dy)
    ang = np.arctan2(np.abs(dx), dy)
    # distance outside the edge lines: r * sin(ang - half) for points beyond the angle
    edge = r * np.sin(np.clip(ang - half, 0.0, None))
    return (r <= radius + margin) & (edge <= margin) & (dy >= -margin)


# ---------------------------------------------------------------- corpus plan


def _stratified(n: int, fraction: float, offset: float) -> np.ndarray:
    """bool [n]: True for round(n * fraction) evenly spread indices (Bresenham)."""
    i = np.arange(n + 1)
    return np.diff(np.floor(i * fraction + offset)) > 0


def plan_corpus(cfg: SynthConfig) -> list[ClipSpec]:
    """Draw every clip's parameters from `cfg.seed`; cheap (no rendering)."""
    cfg.validate()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5E7]))
    n = cfg.videos
    # patients: 1..max views each; patient 0 has two so every corpus has a multi-view patient
    weights = np.array([3.0, 4.0, 3.0, 2.0][: cfg.max_views_per_patient])
    counts: list[int] = []
    while sum(counts) < n:
        k = 2 if not counts else 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
        counts.append(min(k, cfg.max_views_per_patient, n - sum(counts)))
    n_pat = len(counts)
    grades = rng.permutation(np.resize(np.arange(3), n_pat))  # balanced grades
    efs = rng.uniform(cfg.min_ef, cfg.max_ef, n_pat)
    lv_scales = rng.uniform(0.92, 1.08, n_pat)
    order = rng.permutation(n_pat)
    # at least one val and one test patient once there are three patients
    n_test = max(round(cfg.test_fraction * n_pat), int(cfg.test_fraction > 0)) if n_pat >= 3 else 0
    n_val = max(round(cfg.val_fraction * n_pat), int(cfg.val_fraction > 0)) if n_pat >= 3 else 0
    split_of = np.empty(n_pat, dtype=object)
    split_of[order[:n_test]] = "test"
    split_of[order[n_test:n_test + n_val]] = "val"
    split_of[order[n_test + n_val:]] = "train"
    # containers and short clips spread evenly over the corpus (so small corpora get each)
    dcm = _stratified(n, cfg.dicom_fraction, 0.5)
    avi = _stratified(n, cfg.avi_fraction, 0.8) & ~dcm
    short = _stratified(n, cfg.short_fraction, 0.6)
    view_cursor = int(rng.integers(len(VIEWS)))
    specs: list[ClipSpec] = []
    for p, count in enumerate(counts):
        patient = f"s{cfg.seed}p{p:04d}"
        for j in range(count):
            i = len(specs)
            view = VIEWS[(view_cursor + j) % len(VIEWS)]
            if short[i]:
                period = int(rng.integers(cfg.min_period, min(cfg.max_period, 30) + 1))
                frames = int(rng.integers(min(period + 1, 31), 32))
            else:
                period = int(rng.integers(cfg.min_period, min(cfg.max_period, cfg.max_frames - 1) + 1))
                frames = int(rng.integers(max(cfg.min_frames, period + 1), cfg.max_frames + 1))
            # fps such that the heart rate 60 * fps / period stays within 40-160 bpm
            lo = max(cfg.min_fps, math.ceil(period * 40 / 60))
            hi = max(lo, min(cfg.max_fps, math.floor(period * 160 / 60)))
            fps = int(rng.integers(lo, hi + 1))
            height = 2 * int(rng.integers(cfg.min_size // 2, cfg.max_size // 2 + 1))
            width = 2 * round(height * rng.uniform(1.05, 1.35) / 2)
            container = "dcm" if dcm[i] else "avi" if avi[i] else "mp4"
            specs.append(ClipSpec(
                name=f"{patient}_{view.lower()}", patient=patient, view=view,
                ef=round(float(efs[p]), 2), grade=int(grades[p]), period=period,
                ed_offset=int(rng.integers(period)),
                systole=max(2, round(period * rng.uniform(0.33, 0.4))),
                fps=fps, frames=frames, height=height, width=width, container=container,
                split=str(split_of[p]), lv_scale=float(lv_scales[p]), nuisance=cfg.nuisance,
                seed=int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0])))
        view_cursor += count
    return specs


# ---------------------------------------------------------------- drawing primitives


class _Canvas:
    """Scene units -> pixels: scene (u, v) has the fan apex at (0, 0), v down the fan axis
    and the fan radius as unit length; a pose (rotation about the apex, shift) is applied."""

    def __init__(self, height: int, width: int, rot: float, shift: tuple[float, float]):
        self.h, self.w = height, width
        self.xc, self.y0, self.radius, self.half = sector_geometry(height, width)
        self.cos, self.sin = math.cos(rot), math.sin(rot)
        self.shift = shift

    def point(self, u: float, v: float) -> np.ndarray:
        u, v = u + self.shift[0], v + self.shift[1]
        ur, vr = self.cos * u - self.sin * v, self.sin * u + self.cos * v
        return np.array([self.xc + self.radius * ur, self.y0 + self.radius * vr])

    def vec(self, du: float, dv: float) -> np.ndarray:
        d = np.array([self.cos * du - self.sin * dv, self.sin * du + self.cos * dv])
        return d / np.linalg.norm(d)

    def window(self, cx: float, cy: float, ex: float, ey: float):
        """Slices of the bounding box and the local pixel offsets (x - cx, y - cy)."""
        x0, x1 = max(0, int(cx - ex) - 1), min(self.w, int(cx + ex) + 2)
        y0, y1 = max(0, int(cy - ey) - 1), min(self.h, int(cy + ey) + 2)
        if x0 >= x1 or y0 >= y1:
            return None
        xs = np.arange(x0, x1, dtype=np.float32) - np.float32(cx)
        ys = np.arange(y0, y1, dtype=np.float32) - np.float32(cy)
        return (slice(y0, y1), slice(x0, x1)), xs[None, :], ys[:, None]

    def ellipse(self, center, d, a: float, b: float, half_only: bool = False):
        """Pixels of an ellipse (scene semi-axes a across, b along unit direction d), or of
        its half on the -d side (a 'bullet' with a flat base at `center`).
        Returns (slices, bool region) or None when off-frame."""
        a_px, b_px = a * self.radius, b * self.radius
        ex = math.hypot(a_px * d[1], b_px * d[0])
        ey = math.hypot(a_px * d[0], b_px * d[1])
        win = self.window(center[0], center[1], ex, ey)
        if win is None:
            return None
        sl, xs, ys = win
        along = xs * np.float32(d[0]) + ys * np.float32(d[1])
        across = ys * np.float32(d[0]) - xs * np.float32(d[1])
        inside = (across / a_px) ** 2 + (along / b_px) ** 2 <= 1.0
        if half_only:
            inside &= along <= 0
        return sl, inside

    def segment(self, p0, p1, width: float):
        """Pixels within width/2 (scene units) of the segment p0-p1 (a capsule)."""
        r = 0.5 * width * self.radius
        lo, hi = np.minimum(p0, p1) - r, np.maximum(p0, p1) + r
        win = self.window((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, (hi[0] - lo[0]) / 2, (hi[1] - lo[1]) / 2)
        if win is None:
            return None
        sl, xs, ys = win
        cx, cy = (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2
        px, py = xs + np.float32(cx - p0[0]), ys + np.float32(cy - p0[1])
        seg = p1 - p0
        t = np.clip((px * seg[0] + py * seg[1]) / max(float(seg @ seg), 1e-9), 0.0, 1.0)
        dist2 = (px - t * np.float32(seg[0])) ** 2 + (py - t * np.float32(seg[1])) ** 2
        return sl, dist2 <= r * r


# Valve appearance per grade: leaflet thickness (scene units), brightness, max opening (rad).
_LEAFLET = {0: (0.012, 0.80, math.radians(80)), 1: (0.024, 0.95, math.radians(50)),
            2: (0.038, 1.00, math.radians(25))}
_LEVEL_TISSUE, _LEVEL_BLOOD, _LEVEL_MYO = 0.32, 0.04, 0.62


@dataclass(slots=True)
class _Frame:
    """One frame being drawn: echo level map, label map, bright valve pixels."""

    level: np.ndarray  # float32 [H, W]
    labels: np.ndarray  # uint8 [H, W]
    valve: np.ndarray  # float32 [H, W] valve brightness (0 = none)

    def fill(self, region, level: float | None = None, label: int | None = None):
        if region is None:
            return
        sl, m = region
        if level is not None:
            self.level[sl][m] = level
        if label is not None:
            self.labels[sl][m] = label

    def bright(self, region, value: float):
        if region is not None:
            sl, m = region
            np.maximum(self.valve[sl], np.where(m, np.float32(value), np.float32(0)), out=self.valve[sl])


def _valve(fr: _Frame, cv: _Canvas, center, axis, inflow, half_width: float, opening: float,
           grade: int) -> None:
    """Two leaflets hinged at center +- half_width * axis, swinging toward `inflow` (the
    chamber the flow enters) by `opening` (0 closed .. 1 fully open for this grade)."""
    thick, value, max_open = _LEAFLET[grade]
    phi = math.radians(12) + opening * max_open
    for k in (-1.0, 1.0):
        hinge = center + k * half_width * cv.radius * axis
        direction = math.cos(phi) * (-k * axis) + math.sin(phi) * inflow
        tip = hinge + 1.02 * half_width * cv.radius * direction
        fr.bright(cv.segment(hinge, tip, thick), value)
        if grade == 2:  # calcified nodules at the hinges
            fr.bright(cv.ellipse(hinge, axis, 0.028, 0.028), 1.0)


def _fit_area(shape, target: float | None):
    """shape(f) -> region for a size factor f near 1; returns the region whose pixel count
    is nearest `target` (bisection on f), or shape(1) when target is None. This removes the
    rasterisation error from the LV area, so the EF recomputed from the masks matches the
    label to a fraction of a point."""
    if target is None:
        return shape(1.0)

    def evaluate(f):
        reg = shape(f)
        return f, reg, (0 if reg is None else int(reg[1].sum()))

    lo, hi = evaluate(0.9), evaluate(1.1)
    for _ in range(11):
        mid = evaluate(0.5 * (lo[0] + hi[0]))
        lo, hi = (mid, hi) if mid[2] < target else (lo, mid)
    return lo[1] if abs(lo[2] - target) < abs(hi[2] - target) else hi[1]


def _draw_view(fr: _Frame, cv: _Canvas, spec: ClipSpec, c: float, mitral: float, aortic: float,
               sa_es: float, sb_es: float, lv_ed_area: float | None) -> None:
    """Draw one frame of `spec.view` at cycle value c (1 = ED, 0 = ES). With `lv_ed_area`
    (the cavity's pixel count at ED) the cavity is fitted to lv_ed_area * s_a * s_b pixels."""
    s_a = 1.0 - (1.0 - sa_es) * (1.0 - c)  # LV short-axis scale
    s_b = 1.0 - (1.0 - sb_es) * (1.0 - c)  # LV long-axis scale
    target = None if lv_ed_area is None else lv_ed_area * s_a * s_b
    grow = 1.0 + 0.18 * (1.0 - c)  # atria fill while the ventricles empty
    k = spec.lv_scale
    wall = 0.035 * (1.0 + 0.4 * (1.0 - c))  # myocardium thickens in systole
    g = spec.grade
    if spec.view in ("A4C", "A2C"):
        down = cv.vec(0.0, 1.0)
        across = np.array([-down[1], down[0]])
        if spec.view == "A4C":
            lv_apex, a0, b0, la_far = (0.10, 0.265), 0.095 * k, 0.36 * k, 0.91
            # right heart: bullet RV with the tricuspid at its base, RA below
            rv_b = 0.32 * (1.0 - 0.12 * (1.0 - c))
            rv_base = cv.point(-0.09, 0.29) + down * rv_b * cv.radius
            fr.fill(cv.ellipse(rv_base, down, 0.068 * (1.0 - 0.1 * (1.0 - c)), rv_b, True), _LEVEL_BLOOD)
            ra_top = rv_base + down * 0.02 * cv.radius
            ra_b = (cv.point(-0.10, 0.88)[1] - ra_top[1]) / cv.radius / 2
            fr.fill(cv.ellipse(ra_top + down * ra_b * cv.radius, down, 0.07 * grow, ra_b), _LEVEL_BLOOD)
            _valve(fr, cv, rv_base, across, -down, 0.06, mitral, 0)
        else:
            lv_apex, a0, b0, la_far = (0.0, 0.21), 0.11 * k, 0.38 * k, 0.90
        apex = cv.point(*lv_apex)
        a, b = a0 * s_a, b0 * s_b
        base = apex + down * b * cv.radius
        la_top = base + down * 0.02 * cv.radius
        la_b = max(0.02, (cv.point(lv_apex[0], la_far)[1] - la_top[1]) / cv.radius / 2)
        fr.fill(cv.ellipse(la_top + down * la_b * cv.radius, down, 0.085 * k * grow, la_b), _LEVEL_BLOOD, LA)
        fr.fill(cv.ellipse(base, down, a + wall, b + wall, True), _LEVEL_MYO, LV_MYO)
        fr.fill(_fit_area(lambda f: cv.ellipse(apex + down * b * f * cv.radius, down, a * f, b * f, True),
                          target), _LEVEL_BLOOD, LV_CAVITY)
        _valve(fr, cv, base, across, -down, a0 * 0.8, mitral, g)
    elif spec.view == "PLAX":
        d = cv.vec(0.97, -0.24)  # apex (left) -> base (right), slightly up toward the aorta
        perp = np.array([-d[1], d[0]])  # points down (posterior)
        apex = cv.point(-0.30, 0.58)
        a, b = 0.095 * k * s_a, 0.34 * k * s_b
        base = apex + d * b * cv.radius
        rv_c = cv.point(-0.06, 0.30)
        fr.fill(cv.ellipse(rv_c, d, 0.05 * (1.0 - 0.1 * (1.0 - c)), 0.17), _LEVEL_BLOOD)
        av_c = base - perp * 0.5 * a * cv.radius
        mv_c = base + perp * 0.55 * a * cv.radius
        fr.fill(cv.ellipse(av_c + d * 0.11 * cv.radius, d, 0.045, 0.12), _LEVEL_BLOOD)  # aortic root
        la_c = mv_c + (d * 0.09 + perp * 0.07) * cv.radius
        fr.fill(cv.ellipse(la_c, d, 0.075 * grow, 0.085 * grow), _LEVEL_BLOOD, LA)
        fr.fill(cv.ellipse(base, d, a + wall, b + wall, True), _LEVEL_MYO, LV_MYO)
        fr.fill(_fit_area(lambda f: cv.ellipse(apex + d * b * f * cv.radius, d, a * f, b * f, True),
                          target), _LEVEL_BLOOD, LV_CAVITY)
        _valve(fr, cv, av_c, perp, d, 0.045, aortic, g)
        _valve(fr, cv, mv_c, perp, -d, 0.05, mitral, g)
    else:  # PSAX: LV as a ring, RV crescent beside it, mitral 'fish mouth' inside
        d = cv.vec(0.0, 1.0)
        center = cv.point(0.02, 0.54)
        r = 0.13 * k * s_a  # both radii scale by s_a (set up for a circle in render_clip)
        fr.fill(cv.ellipse(center + cv.vec(-1.0, -0.35) * 0.17 * cv.radius, cv.vec(0.35, -1.0),
                           0.075 * (1.0 - 0.1 * (1.0 - c)), 0.17), _LEVEL_BLOOD)
        fr.fill(cv.ellipse(center, d, r + wall * 1.2, r + wall * 1.2), _LEVEL_MYO, LV_MYO)
        fr.fill(_fit_area(lambda f: cv.ellipse(center, d, r * f, r * f), target), _LEVEL_BLOOD, LV_CAVITY)
        thick, value, max_open = _LEAFLET[g]
        gap = (0.012 + mitral * 0.09 * max_open / _LEAFLET[0][2]) * cv.radius
        across = np.array([d[1], -d[0]])
        for sgn in (-1.0, 1.0):
            mid = center + sgn * gap * d
            half = across * 0.6 * r * cv.radius
            fr.bright(cv.segment(mid - half, mid + half, thick), value)
            if g == 2:
                fr.bright(cv.ellipse(mid + half, d, 0.028, 0.028), 1.0)


# ---------------------------------------------------------------- overlays (text, ECG)

# 3x5 bitmap font, rows top to bottom.
_GLYPHS = {
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###",
    "3": "###,..#,###,..#,###", "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###", "7": "###,..#,..#,.#.,.#.", "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###", "A": ".#.,#.#,###,#.#,#.#", "B": "##.,#.#,##.,#.#,##.",
    "C": ".##,#..,#..,#..,.##", "D": "##.,#.#,#.#,#.#,##.", "E": "###,#..,##.,#..,###",
    "F": "###,#..,##.,#..,#..", "G": ".##,#..,#.#,#.#,.##", "H": "#.#,#.#,###,#.#,#.#",
    "I": "###,.#.,.#.,.#.,###", "J": "..#,..#,..#,#.#,.#.", "K": "#.#,#.#,##.,#.#,#.#",
    "L": "#..,#..,#..,#..,###", "M": "#.#,###,###,#.#,#.#", "N": "##.,#.#,#.#,#.#,#.#",
    "O": ".#.,#.#,#.#,#.#,.#.", "P": "##.,#.#,##.,#..,#..", "Q": ".#.,#.#,#.#,##.,.##",
    "R": "##.,#.#,##.,#.#,#.#", "S": ".##,#..,.#.,..#,##.", "T": "###,.#.,.#.,.#.,.#.",
    "U": "#.#,#.#,#.#,#.#,###", "V": "#.#,#.#,#.#,#.#,.#.", "W": "#.#,#.#,###,###,#.#",
    "X": "#.#,#.#,.#.,#.#,#.#", "Y": "#.#,#.#,.#.,.#.,.#.", "Z": "###,..#,.#.,#..,###",
    ":": "...,.#.,...,.#.,...", ".": "...,...,...,...,.#.", "-": "...,...,###,...,...",
    "/": "..#,..#,.#.,#..,#..", " ": "...,...,...,...,...",
}


def _text_bitmap(text: str, scale: int) -> np.ndarray:
    """bool [5 * scale, 4 * len * scale] rendering of `text` (unknown characters blank)."""
    cols = []
    for ch in text.upper():
        g = np.array([[p == "#" for p in row] for row in _GLYPHS.get(ch, _GLYPHS[" "]).split(",")])
        cols += [g, np.zeros((5, 1), bool)]
    bm = np.concatenate(cols, 1) if cols else np.zeros((5, 0), bool)
    return np.kron(bm, np.ones((scale, scale), bool))


def _ecg_wave(phase: np.ndarray) -> np.ndarray:
    """ECG-like waveform (R peak at phase 0, the ED frame) in about [-0.3, 1]."""
    ph = (phase + 0.5) % 1.0 - 0.5  # R peak centred at 0
    bump = lambda mu, sd, amp: amp * np.exp(-0.5 * ((ph - mu) / sd) ** 2)  # noqa: E731
    return (bump(-0.16, 0.025, 0.15) + bump(-0.018, 0.008, -0.15) + bump(0.0, 0.01, 1.0)
            + bump(0.02, 0.008, -0.3) + bump(0.3, 0.05, 0.3))


def _overlays(spec: ClipSpec, sector_grown: np.ndarray):
    """Static text pixels bool [H, W], ECG trace pixels bool [H, W], ECG y per column
    [W] (or -1), and the ECG x range: all outside the fan."""
    h, w = spec.height, spec.width
    scale = max(1, h // 150)
    text = np.zeros((h, w), bool)
    bpm = round(60.0 * spec.fps / spec.period)
    left = ["ECHOFM SYNTH", spec.patient, f"{spec.fps} FPS"]
    right = [spec.view, f"HR {bpm}", "GAIN 50"]
    line = 7 * scale
    for i, (lt, rt) in enumerate(zip(left, right)):
        y = 2 + i * line
        for s, at_right in ((lt, False), (rt, True)):
            bm = _text_bitmap(s, scale)[:, : w // 2 - 4]
            x = w - 2 - bm.shape[1] if at_right else 2
            hh = min(bm.shape[0], h - y)
            text[y:y + hh, x:x + bm.shape[1]] |= bm[:hh]
    text &= ~sector_grown
    # ECG: a thin polyline in the band below the fan, R peaks at the ED frames
    yb0, yb1 = int(0.885 * h) + 1, int(0.975 * h)
    x0, x1 = int(0.08 * w), int(0.92 * w)
    mid, amp = (yb0 + 2 * yb1) / 3.0, (yb1 - yb0) * 0.55
    px_per_frame = (x1 - x0) / (2.5 * spec.period)
    t = np.arange(x1 - x0 + 1) / px_per_frame
    yc = np.round(mid - amp * _ecg_wave((t - spec.ed_offset) / spec.period)).astype(int)
    yc = np.clip(yc, yb0, yb1)
    lo, hi = np.minimum(yc[:-1], yc[1:]), np.maximum(yc[:-1], yc[1:])
    rows = np.arange(h)[:, None]
    ecg = np.zeros((h, w), bool)
    ecg[:, x0:x1] = (rows >= lo[None, :]) & (rows <= hi[None, :])
    ecg &= ~sector_grown
    return text, ecg, yc, x0, px_per_frame


# ---------------------------------------------------------------- rendering


def render_clip(spec: ClipSpec) -> RenderedClip:
    """Draw `spec` (no file I/O): grey video, masks, fan, overlays and ED/ES frames."""
    rng = np.random.default_rng(spec.seed)
    h, w, n = spec.height, spec.width, spec.frames
    # acquisition variation between scans (real scans differ far more in pose and settings
    # than a random-feature view classifier tolerates): tilt, depth zoom, shift; the ranges
    # keep the LV inside the fan (other chambers may touch its edge)
    jit = spec.nuisance
    cv = _Canvas(h, w, rot=math.radians(rng.uniform(-3, 3) + jit * rng.uniform(-8, 8)),
                 shift=(float(rng.uniform(-0.015, 0.015) + jit * rng.uniform(-0.015, 0.015)),
                        float(rng.uniform(-0.015, 0.015) + jit * rng.uniform(-0.015, 0.015))))
    cv.radius *= 1.0 + jit * rng.uniform(-0.15, 0.08)  # depth setting: scene unit vs fan
    sector = sector_mask(h, w)
    text, ecg, ecg_y, ecg_x0, px_per_frame = _overlays(spec, sector_mask(h, w, margin=3.0))

    # static speckle: Rayleigh noise smoothed along the lateral direction, depth attenuation
    speckle = rng.rayleigh(0.8, (h, w + 2)).astype(np.float32)
    speckle = (speckle[:, :-2] + speckle[:, 1:-1] + speckle[:, 2:]) / 3.0
    # gain, depth attenuation (TGC), speckle contrast and noise level differ per scan
    fan_radius = sector_geometry(h, w)[2]
    depth = np.hypot(*np.mgrid[0:h, 0:w] - np.array([cv.y0, cv.xc])[:, None, None]) / fan_radius
    gain = np.float32(rng.uniform(0.85, 1.15) * (1.0 + jit * rng.uniform(-0.2, 0.25)))
    atten = 0.35 + jit * rng.uniform(-0.2, 0.1)
    contrast = 1.0 + jit * rng.uniform(-0.3, 0.3)
    speckle = 1.0 + contrast * (speckle - 1.0)
    sg = (np.maximum(speckle, 0.05) * (1.0 - atten * depth) * gain * sector).astype(np.float32)
    # per-frame noise: a random window of one larger white-noise field (cheap, and no
    # periodicity that a cycle estimator could lock onto); every fan pixel changes over time
    noise = rng.normal(0.0, 0.035 * (1.0 + jit * rng.uniform(-0.3, 0.6)), (h + 32, w + 32)).astype(np.float32)
    shifts = rng.integers(0, 33, (n, 2))
    base_level = np.where(sector, np.float32(_LEVEL_TISSUE), np.float32(0)).astype(np.float32)

    # LV scales at ES so that (A_es / A_ed)**1.5 = 1 - EF: area ratio r = (1 - EF)**(2/3);
    # apical/PLAX: short axis s_a = r**(2/3), long axis s_b = r**(1/3) (walls move more than
    # the base); PSAX circle: both radii r**(1/2).
    r = (1.0 - spec.ef / 100.0) ** (2.0 / 3.0)
    sa_es, sb_es = (r ** 0.5, r ** 0.5) if spec.view == "PSAX" else (r ** (2 / 3), r ** (1 / 3))
    c, mitral, aortic, ed, es = cycle(n, spec.period, spec.ed_offset, spec.systole)

    # the LV cavity's pixel count at ED: every frame's cavity is fitted to it x analytic ratio
    ref = _Frame(level=base_level.copy(), labels=np.zeros((h, w), np.uint8), valve=np.zeros((h, w), np.float32))
    _draw_view(ref, cv, spec, 1.0, 0.0, 0.0, sa_es, sb_es, None)
    lv_ed_area = float((ref.labels == LV_CAVITY).sum())

    video = np.empty((n, h, w), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    cursor_h = max(1, h // 100)
    for f in range(n):
        fr = _Frame(level=base_level.copy(), labels=masks[f], valve=np.zeros((h, w), np.float32))
        _draw_view(fr, cv, spec, float(c[f]), float(mitral[f]), float(aortic[f]), sa_es, sb_es, lv_ed_area)
        masks[f] *= sector  # a tilted wall may leave the fan: label only what is imaged
        dy, dx = shifts[f]
        img = sg * fr.level + noise[dy:dy + h, dx:dx + w]
        np.maximum(img, fr.valve * (0.9 + 0.1 * speckle), out=img)
        img *= sector  # nothing live outside the fan
        frame = video[f]
        np.clip(img * 255.0, 0, 255, out=img)
        frame[:] = img
        frame[text] = 220
        frame[ecg] = 170
        xcur = ecg_x0 + int((f * px_per_frame) % max(1, len(ecg_y) - 1))  # moving cursor dot
        ycur = ecg_y[xcur - ecg_x0]
        frame[max(0, ycur - cursor_h):ycur + cursor_h + 1, max(0, xcur - cursor_h):xcur + cursor_h + 1] = 255
    return RenderedClip(video=video, masks=masks, sector=sector, overlay=text | ecg, ed=ed, es=es)


# ---------------------------------------------------------------- writers


def write_video(path: str | Path, video: np.ndarray, fps: int, container: str) -> None:
    """Encode grey uint8 [F, H, W] as MP4/H.264 ('mp4') or AVI/MJPEG ('avi') with PyAV.

    Single-threaded encoders (parallelism is across clips) keep the bytes deterministic.
    """
    import av

    n, h, w = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: yuv420 needs even frame sizes, got {h}x{w}")
    codec, pix, opts = {
        "mp4": ("libx264", "yuv420p", {"preset": "ultrafast", "crf": "18", "g": "16", "bf": "0"}),
        "avi": ("mjpeg", "yuvj420p", {"qmin": "2", "qmax": "4"}),
    }[container]
    chroma = np.full((h // 2, w), 128, np.uint8)  # grey: neutral U and V planes
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix
        stream.codec_context.thread_count = 1
        stream.options = opts
        for f in range(n):
            frame = av.VideoFrame.from_ndarray(np.concatenate([video[f], chroma]), format=pix)
            frame.pts = f
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _make_one(job: tuple[str, ClipSpec]) -> dict:
    """Render one clip and write its video + mask; returns its labels row."""
    out_dir, spec = Path(job[0]), job[1]
    clip = render_clip(spec)
    rel_video = f"videos/{spec.name}.{spec.container}"
    rel_mask = f"masks/{spec.name}.npy"
    if spec.container == "dcm":
        from .synth_dicom import write_dicom

        write_dicom(out_dir / rel_video, clip.video, fps=spec.fps, patient=spec.patient,
                    name=spec.name, seed=spec.seed)
    else:
        write_video(out_dir / rel_video, clip.video, spec.fps, spec.container)
    np.save(out_dir / rel_mask, clip.masks)
    return {"file": rel_video, "patient": spec.patient, "view": spec.view, "ef": spec.ef,
            "period": spec.period, "ed": clip.ed, "es": clip.es, "grade": spec.grade,
            "split": spec.split, "mask": rel_mask, "fps": spec.fps, "frames": spec.frames}


def _csv_value(v) -> str:
    if isinstance(v, list):
        return ";".join(str(i) for i in v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def make_corpus(out_dir: str | Path, cfg: SynthConfig) -> list[dict]:
    """Write `cfg.videos` clips under `out_dir` (videos/, masks/, labels.csv).

    Returns the labels rows as dicts keyed by `LABEL_COLUMNS` (ef float, ed/es int lists,
    period/grade/fps/frames int). Output depends only on `cfg` minus `workers`.
    """
    specs = plan_corpus(cfg)
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), s) for s in specs]
    if cfg.workers > 1:
        # spawn: safe even when the caller has threads (torch, DALI) running
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_make_one, jobs, chunksize=1))
    else:
        rows = [_make_one(j) for j in jobs]
    tmp = out_dir / "labels.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(LABEL_COLUMNS)
        for row in rows:
            wr.writerow([_csv_value(row[k]) for k in LABEL_COLUMNS])
    os.replace(tmp, out_dir / "labels.csv")
    return rows


def read_labels(path: str | Path) -> list[dict]:
    """Parse a labels.csv (or the directory holding it) back into typed rows."""
    path = Path(path)
    if path.is_dir():
        path = path / "labels.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ints = ("period", "grade", "fps", "frames")
    for row in rows:
        row["ef"] = float(row["ef"])
        for k in ints:
            row[k] = int(row[k])
        for k in ("ed", "es"):
            row[k] = [int(i) for i in row[k].split(";") if i]
    return rows


def summarize(rows: list[dict]) -> Iterator[str]:
    """Human-readable lines describing a corpus (for the CLI)."""
    def count(key):
        vals = sorted({str(r[key]) for r in rows})
        return ", ".join(f"{v} {sum(str(r[key]) == v for r in rows)}" for v in vals)

    frames = [r["frames"] for r in rows]
    yield (f"{len(rows)} clips, {len({r['patient'] for r in rows})} patients, "
           f"{sum(frames)} frames (clip length {min(frames)}-{max(frames)}, "
           f"{sum(f < 32 for f in frames)} shorter than 32)")
    yield f"views: {count('view')}"
    yield "containers: " + ", ".join(
        f"{ext} {sum(r['file'].endswith('.' + ext) for r in rows)}" for ext in CONTAINERS)
    yield f"grades: {count('grade')}; splits: {count('split')}"
    efs = [r["ef"] for r in rows]
    periods = [r["period"] for r in rows]
    fps = [r["fps"] for r in rows]
    yield (f"EF {min(efs):.1f}-{max(efs):.1f}%, period {min(periods)}-{max(periods)} frames, "
           f"fps {min(fps)}-{max(fps)}")
