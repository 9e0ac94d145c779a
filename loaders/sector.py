"""Ultrasound sector detection and cropping.

The imaging sector is where pixels change over time (speckle, moving walls); burned-in
text, calipers, logos and the UI are static, and an ECG trace is a thin moving line. So:
temporal std of grayscale > threshold -> morphological opening (drops thin lines and
specks) -> closing -> largest connected component -> convex hull (a fan is convex; this
also fills the dark blood pool, which barely changes). Everything outside is blanked,
the frame is cropped to the sector's box, padded to a square and resized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True, slots=True)
class SectorConfig:
    """Sector detection knobs (defaults work on real cines and the synthetic phantom)."""

    min_std: float = 1.0
    """Absolute temporal-std floor (grey levels) for a pixel to count as moving."""
    rel_std: float = 0.1
    """Relative threshold: fraction of the 99th percentile of the temporal std. 0.03 let
    MJPEG's flickering block artefacts around burned-in text and the ECG trace count as
    moving (the ECG band stayed in ~8% of AVI clips' crops); speckle moves far more."""
    min_area: float = 0.02
    """A sector smaller than this fraction of the frame is 'no sector'."""
    max_frames: int = 64
    """Frames (evenly spaced) used for the std; more adds time, not accuracy."""


@dataclass(kw_only=True, slots=True)
class Sector:
    """The detected sector."""

    mask: np.ndarray
    """bool [H, W], True inside the sector."""
    box: tuple[int, int, int, int]
    """(y0, y1, x0, x1) bounding box, end-exclusive."""

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean())


def detect_sector(frames: np.ndarray, cfg: SectorConfig | None = None) -> Sector | None:
    """Find the ultrasound sector in uint8 [F, H, W, 3] (or [F, H, W]) frames; None if none."""
    import cv2

    from .video_io import to_gray

    cfg = cfg or SectorConfig()
    f = frames.shape[0]
    sel = frames[np.linspace(0, f - 1, min(f, cfg.max_frames)).round().astype(int)]
    gray = to_gray(sel).astype(np.float32)
    std = gray.std(0)
    thresh = max(cfg.min_std, cfg.rel_std * float(np.percentile(std, 99)))
    moving = (std > thresh).astype(np.uint8)
    h, w = moving.shape
    # Closing first fills the sparse speckle of dim far-field regions into solid area; then
    # an opening with a disc wider than an ECG trace, its moving cursor or a text stroke
    # drops those thin structures (and any bridge the closing made to them).
    k = max(5, round(min(h, w) / 40)) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    moving = cv2.morphologyEx(moving, cv2.MORPH_CLOSE, kernel)
    moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, kernel)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
    if n < 2:
        return None
    big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    pts = cv2.findNonZero((lab == big).astype(np.uint8))
    hull = cv2.convexHull(pts)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    mask = mask.astype(bool)
    if mask.mean() < cfg.min_area:
        return None
    ys, xs = np.nonzero(mask)
    return Sector(mask=mask, box=(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))


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
