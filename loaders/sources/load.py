"""Decode one `Clip`: its frames (through a size-bounded sink) and its masks.

Ingest workers call `load_clip`; it picks the reader the adapter named (video, DICOM, NIfTI).
Frames are shrunk on arrival so that the shorter side is at most `short_side` (0: keep), so
a clip's memory is bounded by the kept size, not the source's; masks follow at the same size.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from .base import Clip, Decoded, SegSpec


def load_clip(clip: Clip, short_side: int = 0) -> Decoded:
    """Decode a clip's pixels and masks. Raises DataError naming the file on failure."""
    if clip.reader == "video":
        from ..video_io import decode_video

        frames, fps, sink, rep = decode_video(clip.source, short_side)
        dec = Decoded(frames=frames, fps=fps, source_size=sink.source_size, scale=sink.scale,
                      problems=rep.problems)
    elif clip.reader == "dicom":
        from .dicom import read_dicom

        dec = read_dicom(clip.source, short_side)
    elif clip.reader == "nifti":
        from .camus import read_nifti_frames

        dec = read_nifti_frames(clip.source, short_side)
    else:
        raise ValueError(f"unknown reader {clip.reader!r}")
    if clip.fps:
        dec.fps = float(clip.fps)
    if clip.seg is not None:
        dec.seg, dec.seg_frames = load_seg(clip.seg, dec, clip.source)
    return dec


def load_seg(spec: SegSpec, dec: Decoded, source: str) -> tuple[np.ndarray, list[int]]:
    """Label maps uint8 [F, h, w] at the decoded frames' size (nearest-neighbour), and the
    annotated frames. File masks must match the source's (frames, height, width)."""
    import cv2

    f, h, w = dec.frames.shape[:3]
    sh, sw = dec.source_size or (h, w)
    if spec.kind == "polygons":
        seg = np.zeros((f, h, w), np.uint8)
        for t, pts in spec.polygons.items():
            if 0 <= t < f and len(pts) >= 3:
                # fillPoly wants integer vertices; 4 bits of sub-pixel shift keeps tracing precision.
                p = np.round(np.asarray(pts, np.float64) * dec.scale * 16).astype(np.int32)
                cv2.fillPoly(seg[t], [p], 1, lineType=cv2.LINE_8, shift=4)
    else:
        seg = _read_mask(spec)
        if seg.ndim != 3 or tuple(seg.shape) != (f, sh, sw):
            raise DataError(f"{spec.path or source}: mask shape {tuple(seg.shape)} does not match video "
                            f"{(f, sh, sw)} (frames, height, width)")
        seg = seg.astype(np.uint8, copy=False)
        if (h, w) != (sh, sw):
            seg = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in seg])
    if spec.frames is not None:
        frames = sorted({int(t) for t in spec.frames if 0 <= int(t) < f})
    else:
        frames = [int(t) for t in np.flatnonzero(seg.reshape(f, -1).max(1) > 0)]
    return seg, frames


def _read_mask(spec: SegSpec) -> np.ndarray:
    if spec.kind == "nifti":
        from .camus import read_nifti_labels

        return read_nifti_labels(spec.path)
    try:
        return np.load(spec.path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{spec.path}: cannot read mask ({e})") from e
