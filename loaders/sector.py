"""Ultrasound sector detection and cropping.

The imaging sector (the fan) is where the picture lives: every pixel of it is lit in some
frame and it keeps changing (speckle, noise, moving walls). Burned-in text, calipers, depth
marks and logos are frozen; an ECG trace is a thin line (often coloured). So, over the whole
clip - the union over time, not one frame and not one threshold on one statistic:

1. per pixel (3x3-blurred: codec noise): lit = its brightest value stands above the black
   background; frozen = lit but never changing (overlays, and the codec ringing around them);
   coloured pixels of a grey clip are overlays too;
2. the lit map, closed (speckle gaps, blood pools) and opened with a disc wider than a text
   stroke or an ECG trace; the component with the most moving pixels is the fan's core;
3. the fan's geometry is fitted to the core's convex hull: two straight edges (robust line
   fits to the hull's left and right outline, rows where the fan leaves the frame ignored),
   their apex, and an arc (along rays from the apex: the radius most rays end at; none when
   the arc is below the frame). The mask is that fan grown by a margin; what sticks out of it
   is an overlay fused to the fan and is left out. When the outline is not a fan (a linear
   probe) or a thick part of the core would be left out, the mask is the core's hull;
4. small frozen blobs beside the fan (an orientation dot at the apex) are blanked.

The box (the crop) is the mask's bounding box: it comes from the edges and the arc, so codec
noise does not move it. Everything outside the mask is blanked, the frame is cropped to the
box, padded to a square and resized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True, slots=True)
class SectorConfig:
    """Sector detection knobs (defaults work on real cines and the synthetic phantom)."""

    detect_side: int = 320
    """Detection runs on frames shrunk so the longer side is at most this many pixels."""
    min_level: float = 12.0
    """A pixel is lit when its brightest (3x3-blurred) value exceeds the background by this."""
    static_std: float = 0.3
    """A lit pixel whose (3x3-blurred) temporal std stays below this is a burned-in overlay."""
    min_std: float = 1.5
    """A pixel moves when its (3x3-blurred) temporal std exceeds this many grey levels..."""
    rel_std: float = 0.03
    """...and this fraction of the 99th percentile of the temporal std. Low on purpose: a dim,
    slow far field must count; thin flicker (MJPEG blocks around text, the ECG trace) is
    dropped by the opening, not by the threshold."""
    min_area: float = 0.02
    """A sector smaller than this fraction of the frame is 'no sector'."""
    open_frac: float = 1 / 40
    open_min: int = 5
    """The opening disc's diameter: this fraction of the shorter side, at least open_min pixels
    (wider than an ECG trace, a text stroke or a caliper; MJPEG's 8x8 flicker around a depth
    mark near the fan needs 9).."""
    colour_spread: float = 40.0
    """A pixel whose RGB channels ever differ by more than this is coloured..."""
    max_overlay_colour: float = 0.1
    """...and when coloured pixels are fewer than this fraction of the lit ones (a grey fan),
    they are overlays and do not count as lit."""
    close_size: int = 5
    """The closing disc (pixels): small, so it fills speckle gaps but does not bridge the few
    black pixels between the arc and an ECG trace drawn just below it."""
    min_moving: float = 0.05
    """A lit component can be the fan only if at least this fraction of it moves; the fan is
    the one with the most moving pixels (text and marks hardly move)."""
    max_rival: float = 0.5
    """A second moving region with this fraction of the fan's moving pixels means several fans
    (a figure of clips, a dual view): no single sector."""
    margin: float = 1.0
    """Pixels (at detection size) the mask is grown by beyond the fitted edges and arc."""
    max_outside: float = 0.015
    """A geometric fit that leaves more than this fraction of the core outside is rejected."""


@dataclass(kw_only=True, slots=True)
class Sector:
    """The detected sector."""

    mask: np.ndarray
    """bool [H, W], True inside the sector."""
    box: tuple[int, int, int, int]
    """(y0, y1, x0, x1) bounding box, end-exclusive."""
    shape: str = "hull"
    """'fan' (apex, two edges and an arc were fitted) or 'hull' (the core's convex hull)."""

    @property
    def crop_fraction(self) -> float:
        """Fraction of the frame's pixels outside the box (what the crop removes)."""
        y0, y1, x0, x1 = self.box
        return 1.0 - (y1 - y0) * (x1 - x0) / self.mask.size


def detect_sector(frames: np.ndarray, cfg: SectorConfig | None = None) -> Sector | None:
    """Find the ultrasound sector in uint8 [F, H, W, 3] (or [F, H, W]) frames; None if none."""
    import cv2

    cfg = cfg or SectorConfig()
    h, w = frames.shape[1:3]
    scale = min(1.0, cfg.detect_side / max(h, w))
    lit, moving, frozen = _time_union(frames, scale, cfg)
    core = _fan_core(lit, moving, cfg)
    if core is None or core.mean() < cfg.min_area:
        return None
    hull = _hull_mask(core)
    fan = fit_fan(core, hull, cfg)
    small, shape = (fan, "fan") if fan is not None else (hull, "hull")
    if shape == "hull" and cfg.margin > 0:
        r = max(1, int(np.ceil(cfg.margin)))
        small = cv2.dilate(small.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0
    small &= ~_marks(frozen & ~hull, core.sum())
    mask = small if scale == 1.0 else cv2.resize(small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    if mask.mean() < cfg.min_area:
        return None
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return Sector(mask=mask, box=(int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1), shape=shape)


def _time_union(frames: np.ndarray, scale: float, cfg: SectorConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lit, moving, frozen) bool [h, w] at detection size over all frames: lit = brightest value
    above the background + min_level and not frozen; moving = temporal std above
    max(min_std, rel_std * p99); frozen = lit with a temporal std below static_std (overlays)."""
    import cv2

    from .video_io import to_gray

    f, h, w = frames.shape[:3]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    hi = np.zeros(size[::-1], np.float32)
    s1 = np.zeros(size[::-1], np.float64)
    s2 = np.zeros(size[::-1], np.float64)
    tint = np.zeros(size[::-1], np.float32) if frames.ndim == 4 else None
    for t in range(f):  # one frame at a time: no float copy of the clip
        g = to_gray(frames[t:t + 1])[0]
        if scale < 1.0:
            g = cv2.resize(g, size, interpolation=cv2.INTER_AREA)
        g = cv2.blur(g.astype(np.float32), (3, 3))  # codec noise (MJPEG blocks, ringing) out
        np.maximum(hi, g, out=hi)
        s1 += g
        s2 += np.square(g, dtype=np.float64)
        if tint is not None:  # how far from grey each pixel gets (overlays are coloured)
            spread = (frames[t].max(-1) - frames[t].min(-1)).astype(np.uint8)
            if scale < 1.0:  # a max filter first: shrinking must not average thin lines away
                k = int(np.ceil(1 / scale)) | 1
                spread = cv2.resize(cv2.dilate(spread, np.ones((k, k), np.uint8)), size,
                                    interpolation=cv2.INTER_NEAREST)
            np.maximum(tint, spread, out=tint, casting="unsafe")
    std = np.sqrt(np.maximum(s2 / f - np.square(s1 / f), 0.0))
    background = float(np.percentile(hi, 2))
    lit = hi > background + cfg.min_level
    # lit but frozen: burned-in text, marks (and the codec ringing around them) - not fan
    frozen = lit & (std <= cfg.static_std)
    lit &= ~frozen
    if tint is not None:
        coloured = tint > cfg.colour_spread
        # a grey fan with a few coloured pixels: those are overlays (ECG traces, markers); a
        # colour Doppler fan has many, and keeps them
        if coloured.sum() < cfg.max_overlay_colour * max(lit.sum(), 1):
            lit &= ~cv2.dilate(coloured.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    moving = std > max(cfg.min_std, cfg.rel_std * float(np.percentile(std, 99)))
    return lit, moving, frozen


def _fan_core(lit: np.ndarray, moving: np.ndarray, cfg: SectorConfig) -> np.ndarray | None:
    """Close the lit map (fill speckle gaps, blood pools), open it with a disc wider than thin
    overlays, and keep the connected component with the most moving pixels (static ones are
    text, logos, marks) -> bool [h, w] or None."""
    import cv2

    h, w = lit.shape
    k = max(cfg.open_min, round(min(h, w) * cfg.open_frac)) | 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    # a 3x3 opening first drops 1-2 pixel lines (an ECG trace, text strokes) that the closing
    # would otherwise fuse to the fan's arc; the closing fills speckle gaps and blood pools;
    # the opening with the disc drops thicker overlays and what the closing bridged to them
    small = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.close_size,) * 2)
    m = cv2.morphologyEx(lit.astype(np.uint8), cv2.MORPH_CLOSE, small)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, disc)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n < 2:
        return None
    moved = np.bincount(lab[moving], minlength=n)
    live = sorted((i for i in range(1, n) if moved[i] >= cfg.min_moving * stats[i, cv2.CC_STAT_AREA]),
                  key=lambda i: -moved[i])
    if not live or (len(live) > 1 and moved[live[1]] >= cfg.max_rival * moved[live[0]]):
        return None  # nothing moves, or two fans (a figure, a dual view): not one clip
    return lab == live[0]


def _marks(frozen: np.ndarray, fan_area: int, max_frac: float = 0.01) -> np.ndarray:
    """Burned-in marks beside the fan (an orientation dot at the apex, depth marks): the small
    frozen blobs of `frozen` (pass those outside the fan's hull) -> bool. A large frozen
    region is left alone (a dim, barely changing part of the fan)."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats(frozen.astype(np.uint8), connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] <= max_frac * fan_area)
    return np.isin(lab, small[small > 0])


def _fill_holes(region: np.ndarray) -> np.ndarray:
    """region with its enclosed holes (blood pools) filled -> bool."""
    import cv2

    flood = np.pad(1 - region.astype(np.uint8), 1)
    cv2.floodFill(flood, None, (0, 0), 2)
    return region | (flood[1:-1, 1:-1] == 0)


def _hull_mask(region: np.ndarray) -> np.ndarray:
    import cv2

    hull = cv2.convexHull(cv2.findNonZero(region.astype(np.uint8)))
    out = np.zeros(region.shape, np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool) | region


def fit_fan(core: np.ndarray, hull: np.ndarray, cfg: SectorConfig) -> np.ndarray | None:
    """The fan (apex, two straight edges, an arc) that holds `core` (bool [h, w]), grown by
    cfg.margin -> bool [h, w]; None when the outline is not a fan. The edges are fitted to
    the outline of the core's convex hull (dark stretches along a fan edge - lung, no tissue -
    bend the core's own outline inwards)."""
    h, w = core.shape
    rows = np.flatnonzero(hull.any(1))
    left = np.array([np.argmax(hull[y]) for y in rows], np.float64)
    right = np.array([w - 1 - np.argmax(hull[y, ::-1]) for y in rows], np.float64)
    # the straight edges live in the upper part of the fan, where it does not touch the frame
    upper = rows <= rows[0] + 0.6 * (rows[-1] - rows[0])
    lines = []
    for xs, inside in ((left, left > 1), (right, right < w - 2)):
        sel = upper & inside
        if sel.sum() < max(6, 0.15 * len(rows)):
            return None
        lines.append(_robust_line(rows[sel].astype(np.float64), xs[sel]))
    (a_l, b_l), (a_r, b_r) = lines  # x = a * y + b
    if a_l >= 0 or a_r <= 0 or not (0.2 < np.degrees(np.arctan(a_r) - np.arctan(a_l)) / 2 < 80):
        return None  # not diverging edges with a plausible half-angle: no fan
    ya = (b_r - b_l) / (a_l - a_r)  # apex: where the two edges meet
    xa = a_l * ya + b_l
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # signed distance inside each edge line (positive inside the fan), in pixels
    d_left = (xx - (a_l * yy + b_l)) / np.hypot(1.0, a_l)
    d_right = ((a_r * yy + b_r) - xx) / np.hypot(1.0, a_r)
    r = np.hypot(yy - ya, xx - xa)
    wedge = (d_left >= -cfg.margin) & (d_right >= -cfg.margin) & (yy >= ya - cfg.margin)
    k = max(cfg.open_min, round(min(h, w) * cfg.open_frac)) | 1
    radius = _arc_radius(core, ya, xa, a_l, a_r, thick=2 * k)
    fan = wedge & (r <= radius + cfg.margin)
    # what sticks out of a good fit is an overlay fused to the fan: thin (an ECG trace, depth
    # marks) or a few pixels; a thick or large protrusion means the outline is not a fan
    import cv2

    out = cv2.morphologyEx((core & ~fan).astype(np.uint8), cv2.MORPH_OPEN, np.ones((k + 2, k + 2), np.uint8))
    if out.sum() > cfg.max_outside * core.sum():
        return None
    return fan


def _arc_radius(core: np.ndarray, ya: float, xa: float, a_l: float, a_r: float, thick: float,
                n_rays: int = 61) -> float:
    """The arc's radius: along rays from the apex across the wedge, the fan ends where the core
    (holes filled) stops and does not resume with at least `thick` pixels (a dark stretch
    inside the fan is followed by more fan; the black gap between the arc and an ECG trace
    by a thin line); the radius most rays that end inside the frame end at (`_common_end`).
    No common end (the arc is below the frame, dark stretches along the fan): the farthest
    core pixel."""
    import cv2

    h, w = core.shape
    solid = _fill_holes(core)  # enclosed holes (blood pools) filled
    # angles from the downward axis: x = xa + r sin(t), y = ya + r cos(t)
    theta = np.linspace(np.arctan(a_l), np.arctan(a_r), n_rays)[1:-1]
    step = 0.5
    r = np.arange(0.0, np.hypot(h, w) + 2, step)
    ys = ya + r[None, :] * np.cos(theta)[:, None]
    xs = xa + r[None, :] * np.sin(theta)[:, None]
    inside = (ys >= 0) & (ys <= h - 1) & (xs >= 0) & (xs <= w - 1)
    hit = np.zeros_like(inside)
    hit[inside] = solid[np.round(ys[inside]).astype(int), np.round(xs[inside]).astype(int)]
    ends = []
    for i in range(len(theta)):
        runs = _runs(hit[i])
        if not runs:
            continue
        end = runs[0][1]
        for a, b in runs[1:]:
            if (b - a) * step < thick:
                break  # a thin line beyond a gap: not fan
            end = b
        if end + 2 >= len(r) or inside[i, end + 2]:  # (a ray that leaves the frame in the fan: no end)
            ends.append(r[end])
    arc = _common_end(np.asarray(ends, np.float64), len(theta))
    if arc is None:
        # the arc is below the frame, or the rays end at no common radius (dark stretches
        # along the fan, no visible arc): the farthest core pixel bounds the fan
        yy, xx = np.nonzero(core)
        return float(np.hypot(yy - ya, xx - xa).max())
    return arc


def _common_end(ends: np.ndarray, n_rays: int, tol: float = 0.03, share: float = 0.3) -> float | None:
    """The radius most rays end at (within +-tol of it, at least `share` of all rays): the arc.
    Rays through an overlay fused below the arc end farther, at radii that vary with the
    angle; returns the far edge of the densest cluster, or None when there is none."""
    if len(ends) < 5:
        return None
    near = np.abs(ends[:, None] - ends[None, :]) <= tol * ends[None, :]
    counts = near.sum(0)
    best = int(np.argmax(counts))
    if counts[best] < share * n_rays:
        return None
    return float(np.median(ends[near[:, best]]))


def _runs(on: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last)] index ranges of the True runs of a bool vector."""
    d = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1))


def _robust_line(y: np.ndarray, x: np.ndarray, iters: int = 5) -> tuple[float, float]:
    """x = a * y + b fitted by iteratively reweighted least squares (Tukey's biweight), so a
    few boundary points pulled out by overlays or dark edges do not tilt the line."""
    wts = np.ones_like(y)
    a, b = 0.0, float(np.median(x))
    for _ in range(iters):
        A = np.stack([y * wts, wts], 1)
        a, b = np.linalg.lstsq(A, x * wts, rcond=None)[0]
        res = x - (a * y + b)
        c = 4.685 * max(1.4826 * float(np.median(np.abs(res))), 0.5)
        u = np.clip(res / c, -1, 1)
        wts = np.sqrt((1 - u**2) ** 2)
    return float(a), float(b)


def _square(a: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """Crop [F, H, W, ...] to box, zero outside `mask` (bool [H, W]) if given, and zero-pad
    (centred) to a square — one pass, no full-frame temporaries."""
    y0, y1, x0, x1 = box
    crop = a[:, y0:y1, x0:x1]
    h, w = crop.shape[1:3]
    s = max(h, w)
    out = np.zeros((a.shape[0], s, s) + a.shape[3:], a.dtype)
    dst = out[:, (s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w]
    if mask is None:
        dst[...] = crop
    else:
        m = mask[y0:y1, x0:x1].reshape((1, h, w) + (1,) * (a.ndim - 3))
        np.multiply(crop, m, out=dst, casting="unsafe")
    return out


def crop_resize(frames: np.ndarray, sector: Sector | None, size: int) -> np.ndarray:
    """Blank outside the sector, crop to it, pad square, resize: uint8 [F, H, W(, 3)] -> [F, size, size(, 3)].

    INTER_AREA when shrinking (an antialiasing box filter), bilinear when enlarging.
    """
    import cv2

    if sector is not None:
        frames = _square(frames, sector.box, sector.mask)
    else:
        frames = _square(frames, (0, frames.shape[1], 0, frames.shape[2]))
    interp = cv2.INTER_AREA if frames.shape[1] >= size else cv2.INTER_LINEAR
    out = np.empty((frames.shape[0], size, size) + frames.shape[3:], np.uint8)
    for t in range(frames.shape[0]):
        cv2.resize(frames[t], (size, size), dst=out[t], interpolation=interp)
    return out


def crop_resize_seg(seg: np.ndarray, sector: Sector | None, size: int) -> np.ndarray:
    """Label maps uint8 [F, H, W] through the same crop/pad, nearest-neighbour resize -> [F, size, size]."""
    import cv2

    box = sector.box if sector is not None else (0, seg.shape[1], 0, seg.shape[2])
    seg = _square(seg, box)
    out = np.empty((seg.shape[0], size, size), np.uint8)
    for t in range(seg.shape[0]):
        out[t] = cv2.resize(seg[t], (size, size), interpolation=cv2.INTER_NEAREST)
    return out
