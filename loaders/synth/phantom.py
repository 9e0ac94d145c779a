"""The phantom: one clip's pixels and masks from its `ClipSpec` (no file I/O).

A fan-shaped ultrasound sector with static speckle (depth attenuation, per-scan gain,
contrast) and per-frame noise; inside it the chambers of one view, drawn in scene units
(fan apex at the origin, fan radius = 1) through a per-scan pose (tilt, shift, depth zoom)
and the heart's zoom (`heart_scale`); a pose that would cut the LV is turned back toward
neutral, as a sonographer keeps the LV in view. The cycle curve c(t) (1 at ED, 0 at ES)
drives the LV, atria, RV, walls and valve leaflets; with `ef_coupling` everything but the
LV moves in proportion to the LV's stroke, so a weak heart moves less everywhere. The LV
cavity is fitted to an exact pixel count per frame, so that EF = 100 * (1 -
(A_es / A_ed)**1.5) of the written masks matches the label to a fraction of a point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .overlays import draw_overlays, render_overlays
from .plan import ClipSpec

LV_CAVITY, LV_MYO, LA = 1, 2, 3
"""Mask values (CAMUS convention); 0 is background."""

# Valve appearance per grade: leaflet thickness (scene units), brightness, max opening (rad).
_LEAFLET = {0: (0.012, 0.80, math.radians(80)), 1: (0.024, 0.95, math.radians(50)),
            2: (0.038, 1.00, math.radians(25))}
_LEVEL_TISSUE, _LEVEL_BLOOD, _LEVEL_MYO = 0.32, 0.04, 0.62
HEART_CENTER = 0.35
"""Depth (fan radii) that `ClipSpec.heart_scale` zooms about: the LV apex stays clear of
the fan's narrow top while the atria grow toward the far edge."""
AIM_TRIES = 3
"""Halvings of an off-target pose's tilt and shift before the neutral pose is used."""


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


# ---------------------------------------------------------------- cycle and sector


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
    """bool [H, W] pixels inside the fan, grown by `margin` pixels (shrunk when negative)."""
    xc, y0, radius, half = sector_geometry(height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = x - xc, y - y0
    r = np.hypot(dx, dy)
    ang = np.arctan2(np.abs(dx), dy)
    # signed distance to the edge lines: r * sin(ang - half), negative inside the angle
    edge = r * np.sin(ang - half)
    return (r <= radius + margin) & (edge <= margin) & (dy >= -margin)


# ---------------------------------------------------------------- drawing primitives


@dataclass(kw_only=True, slots=True, frozen=True)
class _Pose:
    """Where the probe looks: tilt about the fan apex, shift (scene units), depth setting
    (scene unit / fan radius) and the heart's zoom about depth HEART_CENTER."""

    rot: float
    """Radians."""
    shift: tuple[float, float]
    depth: float = 1.0
    zoom: float = 1.0

    def reaimed(self, keep: float) -> _Pose:
        """The probe turned back toward the neutral pose: tilt and shift times `keep`."""
        return _Pose(rot=self.rot * keep, shift=(self.shift[0] * keep, self.shift[1] * keep),
                     depth=self.depth, zoom=self.zoom)


class _Canvas:
    """Scene units -> pixels: scene (u, v) has the fan apex at (0, 0), v down the fan axis
    and the fan radius as unit length; the pose's rotation and shift are applied, and its
    depth and zoom scale the scene unit."""

    def __init__(self, height: int, width: int, pose: _Pose):
        self.h, self.w = height, width
        self.xc, self.y0, self.radius, self.half = sector_geometry(height, width)
        self.cos, self.sin = math.cos(pose.rot), math.sin(pose.rot)
        self.radius = self.radius * pose.depth * pose.zoom
        # zooming by z about depth c = scaling the unit by z and moving the scene up by c (1 - 1/z)
        self.shift = (pose.shift[0], pose.shift[1] - HEART_CENTER * (1.0 - 1.0 / pose.zoom))

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


# ---------------------------------------------------------------- the four views


@dataclass(kw_only=True, slots=True)
class _Phase:
    """One frame's state of the cycle, shared by the view drawers."""

    c: float
    """Cycle value, 1 at ED, 0 at ES."""
    mitral: float
    aortic: float
    s_a: float
    """LV short-axis scale (1 at ED)."""
    s_b: float
    """LV long-axis scale (1 at ED)."""
    target: float | None
    """LV cavity pixel count to fit, or None (the reference ED frame)."""
    stroke: float = 1.0
    """Stroke relative to a normal heart (EF 60), which the atria, RV, valves and wall
    thickening follow."""

    @property
    def grow(self) -> float:
        return 1.0 + 0.18 * self.stroke * (1.0 - self.c)  # atria fill while the ventricles empty

    def rv(self, amount: float) -> float:
        """RV size factor: shrinks by `amount` at ES for a normal stroke."""
        return 1.0 - amount * self.stroke * (1.0 - self.c)

    @property
    def wall(self) -> float:
        return 0.035 * (1.0 + 0.4 * self.stroke * (1.0 - self.c))  # myocardium thickens in systole


def _draw_apical(fr: _Frame, cv: _Canvas, spec: ClipSpec, ph: _Phase) -> None:
    """A4C (LV right of the midline, running down and to the right from an apex near the
    probe; RV and RA on the left) or A2C (LV on the midline): LV as a bullet pointing up
    to the apex, LA below the mitral valve."""
    k = spec.lv_scale
    down = cv.vec(0.0, 1.0)
    if spec.view == "A4C":
        axis, lv_apex, a0, b0, la_far = cv.vec(0.15, 1.0), (0.05, 0.265), 0.095 * k, 0.36 * k, 0.91
        # right heart: bullet RV with the tricuspid at its base, RA below
        rv_b = 0.32 * ph.rv(0.12)
        rv_base = cv.point(-0.12, 0.29) + down * rv_b * cv.radius
        fr.fill(cv.ellipse(rv_base, down, 0.068 * ph.rv(0.1), rv_b, True), _LEVEL_BLOOD)
        ra_top = rv_base + down * 0.02 * cv.radius
        ra_b = (cv.point(-0.13, 0.88)[1] - ra_top[1]) / cv.radius / 2
        fr.fill(cv.ellipse(ra_top + down * ra_b * cv.radius, down, 0.07 * ph.grow, ra_b), _LEVEL_BLOOD)
        _valve(fr, cv, rv_base, np.array([-down[1], down[0]]), -down, 0.06, ph.mitral, 0)
    else:
        axis, lv_apex, a0, b0, la_far = down, (0.0, 0.21), 0.11 * k, 0.38 * k, 0.90
    across = np.array([-axis[1], axis[0]])
    apex = cv.point(*lv_apex)
    a, b = a0 * ph.s_a, b0 * ph.s_b
    base = apex + axis * b * cv.radius
    la_top = base + axis * 0.02 * cv.radius
    la_b = max(0.02, (cv.point(lv_apex[0], la_far)[1] - la_top[1]) / cv.radius / 2)
    fr.fill(cv.ellipse(la_top + axis * la_b * cv.radius, axis, 0.085 * k * ph.grow, la_b), _LEVEL_BLOOD, LA)
    fr.fill(cv.ellipse(base, axis, a + ph.wall, b + ph.wall, True), _LEVEL_MYO, LV_MYO)
    fr.fill(_fit_area(lambda f: cv.ellipse(apex + axis * b * f * cv.radius, axis, a * f, b * f, True),
                      ph.target), _LEVEL_BLOOD, LV_CAVITY)
    _valve(fr, cv, base, across, -axis, a0 * 0.8, ph.mitral, spec.grade)


def _draw_plax(fr: _Frame, cv: _Canvas, spec: ClipSpec, ph: _Phase) -> None:
    """PLAX: the LV lies across the image (apex left), aortic root and valve above the
    mitral valve at its base, LA behind, RV in front."""
    k = spec.lv_scale
    d = cv.vec(0.97, -0.24)  # apex (left) -> base (right), slightly up toward the aorta
    perp = np.array([-d[1], d[0]])  # points down (posterior)
    apex = cv.point(-0.30, 0.58)
    a, b = 0.095 * k * ph.s_a, 0.34 * k * ph.s_b
    base = apex + d * b * cv.radius
    rv_c = cv.point(-0.06, 0.30)
    fr.fill(cv.ellipse(rv_c, d, 0.05 * ph.rv(0.1), 0.17), _LEVEL_BLOOD)
    av_c = base - perp * 0.5 * a * cv.radius
    mv_c = base + perp * 0.55 * a * cv.radius
    fr.fill(cv.ellipse(av_c + d * 0.11 * cv.radius, d, 0.045, 0.12), _LEVEL_BLOOD)  # aortic root
    la_c = mv_c + (d * 0.09 + perp * 0.07) * cv.radius
    fr.fill(cv.ellipse(la_c, d, 0.075 * ph.grow, 0.085 * ph.grow), _LEVEL_BLOOD, LA)
    fr.fill(cv.ellipse(base, d, a + ph.wall, b + ph.wall, True), _LEVEL_MYO, LV_MYO)
    fr.fill(_fit_area(lambda f: cv.ellipse(apex + d * b * f * cv.radius, d, a * f, b * f, True),
                      ph.target), _LEVEL_BLOOD, LV_CAVITY)
    _valve(fr, cv, av_c, perp, d, 0.045, ph.aortic, spec.grade)
    _valve(fr, cv, mv_c, perp, -d, 0.05, ph.mitral, spec.grade)


def _draw_psax(fr: _Frame, cv: _Canvas, spec: ClipSpec, ph: _Phase) -> None:
    """PSAX at the mid-papillary level (the plane used for LV function): the LV as a ring
    with two papillary muscles on its inner wall, the RV crescent beside it. No valve lies
    in this plane, so the valve grade does not show here."""
    d = cv.vec(0.0, 1.0)
    across = np.array([d[1], -d[0]])
    center = cv.point(0.02, 0.54)
    r = 0.13 * spec.lv_scale * ph.s_a  # both radii scale by s_a (a circle: s_a = s_b here)
    fr.fill(cv.ellipse(center + cv.vec(-1.0, -0.35) * 0.17 * cv.radius, cv.vec(0.35, -1.0),
                       0.075 * ph.rv(0.1), 0.17), _LEVEL_BLOOD)
    fr.fill(cv.ellipse(center, d, r + ph.wall * 1.2, r + ph.wall * 1.2), _LEVEL_MYO, LV_MYO)
    fr.fill(_fit_area(lambda f: cv.ellipse(center, d, r * f, r * f), ph.target), _LEVEL_BLOOD, LV_CAVITY)
    # papillary muscles (part of the cavity by the CAMUS convention) ride on the wall
    for side in (-1.0, 1.0):
        at = center + (math.cos(0.9) * d + side * math.sin(0.9) * across) * 0.8 * r * cv.radius
        fr.fill(cv.ellipse(at, d, 0.2 * r, 0.2 * r), _LEVEL_MYO)


_DRAW = {"A4C": _draw_apical, "A2C": _draw_apical, "PLAX": _draw_plax, "PSAX": _draw_psax}


def es_scales(view: str, ef: float) -> tuple[float, float]:
    """LV (short-axis, long-axis) scales at ES such that (A_es / A_ed)**1.5 = 1 - EF.

    Area ratio r = (1 - EF)**(2/3); apical/PLAX: s_a = r**(2/3), s_b = r**(1/3) (walls move
    more than the base); PSAX circle: both r**(1/2)."""
    r = (1.0 - ef / 100.0) ** (2.0 / 3.0)
    return (r ** 0.5, r ** 0.5) if view == "PSAX" else (r ** (2 / 3), r ** (1 / 3))


def relative_stroke(ef: float, coupling: float) -> float:
    """How much the atria, RV, valves and wall thickening move, relative to a normal heart
    (EF 60): the LV cavity's area change at this EF over that at EF 60, blended with 1 by
    `coupling` (0: they move the same at every EF)."""
    change = 1.0 - (1.0 - ef / 100.0) ** (2.0 / 3.0)
    return 1.0 + coupling * (change / (1.0 - 0.4 ** (2.0 / 3.0)) - 1.0)


def _phase(c: float, mitral: float, aortic: float, es: tuple[float, float], target_ed: float | None,
           stroke: float = 1.0) -> _Phase:
    """The frame state at cycle value c; with `target_ed` (the cavity's pixel count at ED)
    the cavity is fitted to target_ed * s_a * s_b pixels. Valves open less with a weak
    stroke (a reduced-EF heart: less mitral excursion, a shorter aortic opening)."""
    s_a = 1.0 - (1.0 - es[0]) * (1.0 - c)
    s_b = 1.0 - (1.0 - es[1]) * (1.0 - c)
    target = None if target_ed is None else target_ed * s_a * s_b
    valve = 0.4 + 0.6 * stroke
    return _Phase(c=c, mitral=mitral * valve, aortic=aortic * valve, s_a=s_a, s_b=s_b, target=target,
                  stroke=stroke)


# ---------------------------------------------------------------- rendering


@dataclass(kw_only=True, slots=True)
class _Scan:
    """One scan's acquisition: pose, fan, speckle x gain map, noise field, frame shifts."""

    pose: _Pose
    sector: np.ndarray
    """bool [H, W]."""
    speckle: np.ndarray
    """float32 [H, W] speckle (valves are drawn brighter where it is high)."""
    gain: np.ndarray
    """float32 [H, W] speckle x depth attenuation x gain, 0 outside the fan."""
    noise: np.ndarray
    """float32 [H + 32, W + 32] white noise; frame f reads the window at shifts[f]."""
    shifts: np.ndarray
    """int [F, 2]."""


def _scan(spec: ClipSpec, rng: np.random.Generator) -> _Scan:
    """Draw the acquisition variation between scans (real scans differ far more in pose and
    settings than a random-feature view classifier tolerates); `_aim` then turns the probe
    back where the LV would leave the fan (other chambers may touch its edge)."""
    h, w, jit = spec.height, spec.width, spec.nuisance
    rot = math.radians(rng.uniform(-3, 3) + jit * rng.uniform(-8, 8))
    shift = (float(rng.uniform(-0.015, 0.015) + jit * rng.uniform(-0.015, 0.015)),
             float(rng.uniform(-0.015, 0.015) + jit * rng.uniform(-0.015, 0.015)))
    depth = 1.0 + jit * rng.uniform(-0.15, 0.08)  # depth setting: scene unit vs fan
    pose = _Pose(rot=rot, shift=shift, depth=depth, zoom=spec.heart_scale)
    sector = sector_mask(h, w)
    # static speckle: Rayleigh noise smoothed along the lateral direction, depth attenuation
    speckle = rng.rayleigh(0.8, (h, w + 2)).astype(np.float32)
    speckle = (speckle[:, :-2] + speckle[:, 1:-1] + speckle[:, 2:]) / 3.0
    # gain, depth attenuation (TGC), speckle contrast and noise level differ per scan
    xc, y0, fan_radius, _ = sector_geometry(h, w)
    dist = np.hypot(*np.mgrid[0:h, 0:w] - np.array([y0, xc])[:, None, None]) / fan_radius
    gain = np.float32(rng.uniform(0.85, 1.15) * (1.0 + jit * rng.uniform(-0.2, 0.25)))
    atten = 0.35 + jit * rng.uniform(-0.2, 0.1)
    contrast = 1.0 + jit * rng.uniform(-0.3, 0.3)
    speckle = 1.0 + contrast * (speckle - 1.0)
    sg = (np.maximum(speckle, 0.05) * (1.0 - atten * dist) * gain * sector).astype(np.float32)
    # per-frame noise: a random window of one larger white-noise field (cheap, and no
    # periodicity that a cycle estimator could lock onto); every fan pixel changes over time
    noise = rng.normal(0.0, 0.035 * (1.0 + jit * rng.uniform(-0.3, 0.6)), (h + 32, w + 32)).astype(np.float32)
    shifts = rng.integers(0, 33, (spec.frames, 2))
    return _Scan(pose=pose, sector=sector, speckle=speckle, gain=sg, noise=noise, shifts=shifts)


def _aim(spec: ClipSpec, pose: _Pose, es: tuple[float, float]) -> tuple[_Canvas, float]:
    """Turn the probe back toward the neutral pose (halving tilt and shift, up to
    AIM_TRIES times, then neutral) until the whole LV at ED lies inside the fan, as a
    sonographer would; -> (canvas, the LV cavity's pixel count at ED)."""
    h, w = spec.height, spec.width
    inner = sector_mask(h, w, margin=-1.0)
    for attempt in range(AIM_TRIES + 1):
        cv = _Canvas(h, w, pose)
        ref = _Frame(level=np.zeros((h, w), np.float32), labels=np.zeros((h, w), np.uint8),
                     valve=np.zeros((h, w), np.float32))
        _DRAW[spec.view](ref, cv, spec, _phase(1.0, 0.0, 0.0, es, None))
        lv = (ref.labels == LV_CAVITY) | (ref.labels == LV_MYO)
        if not (lv & ~inner).any():
            break
        pose = pose.reaimed(0.5 if attempt < AIM_TRIES - 1 else 0.0)
    return cv, float((ref.labels == LV_CAVITY).sum())


def render_clip(spec: ClipSpec) -> RenderedClip:
    """Draw `spec` (no file I/O): grey video, masks, fan, overlays and ED/ES frames."""
    rng = np.random.default_rng(spec.seed)
    h, w, n = spec.height, spec.width, spec.frames
    scan = _scan(spec, rng)
    sector = scan.sector
    ovl = render_overlays(spec, sector_mask(h, w, margin=3.0))
    base_level = np.where(sector, np.float32(_LEVEL_TISSUE), np.float32(0)).astype(np.float32)
    es = es_scales(spec.view, spec.ef)
    c, mitral, aortic, ed_idx, es_idx = cycle(n, spec.period, spec.ed_offset, spec.systole)
    draw = _DRAW[spec.view]
    stroke = relative_stroke(spec.ef, spec.ef_coupling)
    # every frame's LV cavity is fitted to its pixel count at ED x the analytic area ratio
    cv, lv_ed_area = _aim(spec, scan.pose, es)

    video = np.empty((n, h, w), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    for f in range(n):
        fr = _Frame(level=base_level.copy(), labels=masks[f], valve=np.zeros((h, w), np.float32))
        draw(fr, cv, spec, _phase(float(c[f]), float(mitral[f]), float(aortic[f]), es, lv_ed_area, stroke))
        masks[f] *= sector  # a tilted wall may leave the fan: label only what is imaged
        dy, dx = scan.shifts[f]
        img = scan.gain * fr.level + scan.noise[dy:dy + h, dx:dx + w]
        np.maximum(img, fr.valve * (0.9 + 0.1 * scan.speckle), out=img)
        img *= sector  # nothing live outside the fan
        np.clip(img * 255.0, 0, 255, out=img)
        video[f] = img
        draw_overlays(video[f], ovl, f)
    return RenderedClip(video=video, masks=masks, sector=sector, overlay=ovl.text | ovl.ecg, ed=ed_idx, es=es_idx)
