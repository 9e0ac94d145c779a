"""Synthetic stand-ins for what real echo clips do to ingest (issue 15): real clips cannot be
committed, so each failure seen on them is reproduced from the synthetic phantom
(loaders/synth.py): a dim, slow-moving fan edge; calipers and depth marks beside the fan;
respiration drift; the same clip through another codec; irregular beats."""
from __future__ import annotations

import io
import math

import cv2
import numpy as np

from echofm.loaders.synth import ClipSpec, RenderedClip, render_clip, sector_geometry, sector_mask


def phantom(view="A4C", h=128, w=144, frames=40, period=16, fps=30, seed=0, ed_offset=2, systole=None) -> RenderedClip:
    spec = ClipSpec(name="t", patient="p", view=view, ef=50.0, grade=1, period=period, ed_offset=ed_offset,
                    systole=systole or max(3, int(0.35 * period)), fps=fps, frames=frames, height=h, width=w,
                    container="mp4", split="train", seed=seed)
    return render_clip(spec)


def dim_slow_edge(r: RenderedClip, side: int = -1, fraction: float = 0.35, gain: float = 0.25,
                  smooth: int = 9) -> np.ndarray:
    """The video with one lateral part of the fan (the outer `fraction` of its angle on `side`,
    -1 left) dimmed to `gain` and its changes slowed by a temporal box filter of `smooth`
    frames: the far, badly insonated edge that a threshold on one statistic cuts off."""
    h, w = r.sector.shape
    xc, y0, _, half = sector_geometry(h, w)
    y, x = np.mgrid[0:h, 0:w]
    ang = np.arctan2(x - xc, y - y0)  # 0 straight down, negative to the left
    part = r.sector & (side * ang > half * (1 - 2 * fraction))
    v = r.video.astype(np.float32)
    k = np.ones(smooth, np.float32) / smooth
    slow = np.apply_along_axis(lambda s: np.convolve(np.pad(s, smooth // 2, mode="edge"), k, "valid"), 0, v[:, part])
    v[:, part] = slow * gain
    return np.clip(v, 0, 255).astype(np.uint8)


def add_calipers(video: np.ndarray, sector: np.ndarray, gap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Burn static calipers in: a dotted depth scale `gap` px (default 5 + 1% of the side)
    outside the right fan edge and two '+' measurement crosses beside the fan -> (video,
    bool [H, W] of the marks)."""
    h, w = sector.shape
    gap = 5.0 + 0.01 * max(h, w) if gap is None else gap
    xc, y0, radius, half = sector_geometry(h, w)
    marks = np.zeros((h, w), np.uint8)
    for r in np.linspace(0.15, 0.9, 7) * radius:
        x = xc + r * math.sin(half) + gap * math.cos(half)
        y = y0 + r * math.cos(half) - gap * math.sin(half)
        cv2.circle(marks, (int(round(x)), int(round(y))), 1, 1, -1)
    for cx, cy in ((int(0.06 * w), int(0.55 * h)), (int(0.94 * w), int(0.75 * h))):
        cv2.line(marks, (cx - 3, cy), (cx + 3, cy), 1)
        cv2.line(marks, (cx, cy - 3), (cx, cy + 3), 1)
    marks = marks.astype(bool) & ~sector_mask(h, w, margin=3.0)
    out = video.copy()
    out[:, marks] = 200
    return out, marks


def drift(video: np.ndarray, fps: float, amp_px: float = 1.5, gain: float = 0.04, period_s: float = 4.0,
          phase: float = 0.3) -> np.ndarray:
    """Respiration-like slow translation and gain change (not a multiple of the beat)."""
    n, h, w = video.shape[:3]
    out = np.empty_like(video)
    for t in range(n):
        s = math.sin(2 * math.pi * t / (period_s * fps) + phase)
        m = np.float32([[1, 0, amp_px * s], [0, 1, 0.6 * amp_px * s]])
        fr = cv2.warpAffine(video[t], m, (w, h), borderMode=cv2.BORDER_CONSTANT)
        out[t] = np.clip(fr.astype(np.float32) * (1 + gain * s), 0, 255)
    return out


def through_codec(video: np.ndarray, fps: float, codec: str) -> np.ndarray:
    """Encode grey uint8 [F, H, W] with 'h264' (MP4), 'mjpeg' (AVI) or 'vp9' (WebM) at typical
    settings and decode it back as RGB [F, H, W, 3]."""
    import av

    fmt, enc, pix, opts = {"h264": ("mp4", "libx264", "yuv420p", {"crf": "23", "preset": "veryfast"}),
                           "mjpeg": ("avi", "mjpeg", "yuvj420p", {"qmin": "2", "qmax": "6"}),
                           "vp9": ("webm", "libvpx-vp9", "yuv420p", {"crf": "36", "b": "0", "deadline": "realtime",
                                                                     "cpu-used": "8"})}[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(enc, rate=int(round(fps)), options=opts)
        s.width, s.height, s.pix_fmt = video.shape[2], video.shape[1], pix
        for f in video:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="gray")))
        c.mux(s.encode(None))
    with av.open(io.BytesIO(buf.getvalue())) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def irregular(periods: list[int], view="A4C", h=112, w=128, fps=50, seed=0) -> tuple[np.ndarray, list[int], list[int]]:
    """Beats of different lengths back to back (atrial fibrillation): each segment is one
    beat of the same heart (same seed) starting at ED -> (video [F, H, W], ED frames, ES frames)."""
    parts, ed, es, t = [], [], [], 0
    for p in periods:
        r = phantom(view, h, w, frames=p, period=p, fps=fps, seed=seed, ed_offset=0)
        parts.append(r.video)
        ed += [t + e for e in r.ed]
        es += [t + e for e in r.es]
        t += p
    return np.concatenate(parts), ed, es
