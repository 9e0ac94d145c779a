"""The record every source adapter produces, and the one function that loads it.

An adapter turns its layout into `Clip`s (cheap: paths + labels, no decoding). Ingest
workers call `load_clip` to decode the pixels (and masks); a Clip is small and picklable
so it travels to worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


@dataclass(kw_only=True, slots=True)
class SegSpec:
    """Where a clip's segmentation comes from (label maps 0 bg, 1 LV, 2 myocardium, 3 LA)."""

    kind: Literal["npy", "nifti", "polygons"]
    """npy: uint8 [F, H, W] file; nifti: CAMUS `_gt` volume; polygons: {frame: [(x, y), ...]}."""
    path: str = ""
    """File for npy / nifti."""
    polygons: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    """Frame index -> polygon vertices in source pixel coordinates (filled with label 1)."""
    frames: list[int] | None = None
    """Annotated frame indices (None: every frame with a non-zero label)."""


@dataclass(kw_only=True, slots=True)
class Clip:
    """One source clip: where its pixels are and what is known about it."""

    source: str
    """Path of the file holding the pixels (resume identity; hashed into source_sha256)."""
    reader: Literal["video", "dicom", "nifti"]
    """Which decoder reads `source`."""
    dataset: str
    """Short dataset name, first part of the sample key ([A-Za-z0-9-])."""
    patient: str
    """Patient id in clear text; ingest hashes it before anything is written."""
    clip_id: str = ""
    """Non-identifying tag for the key (e.g. the CAMUS view "2CH"); never a file name, which
    often embeds patient ids. Ingest appends a hash of the source path."""
    split: str | None = None
    """Source split (train/val/test) if the layout gives one; else ingest hashes the patient."""
    view: str | None = None
    labels: dict = field(default_factory=dict)
    """Task labels for the json, e.g. {"ef": 55.0, "grade": 1}."""
    fps: float | None = None
    """Frame rate from the layout (overrides what the file says when set)."""
    seg: SegSpec | None = None
    rel_source: str = ""
    """`source` relative to the root the user named (what the json records)."""


@dataclass(kw_only=True, slots=True)
class Decoded:
    """A clip's pixels after decoding (before sector cropping)."""

    frames: np.ndarray
    """uint8 [F, H, W, 3] RGB, or [F, H, W] for grey sources."""
    fps: float
    seg: np.ndarray | None = None
    """uint8 [F, H, W] label maps (0 on frames without annotation) or None."""
    seg_frames: list[int] = field(default_factory=list)


def load_clip(clip: Clip) -> Decoded:
    """Decode a clip's pixels and masks. Raises DataError naming the file on failure."""
    if clip.reader == "video":
        from ..video_io import decode_video

        frames, fps = decode_video(clip.source)
        dec = Decoded(frames=frames, fps=fps)
    elif clip.reader == "dicom":
        from .dicom import read_dicom

        dec = read_dicom(clip.source)
    elif clip.reader == "nifti":
        from .camus import read_nifti_frames

        dec = Decoded(frames=read_nifti_frames(clip.source), fps=0.0)
    else:
        raise ValueError(f"unknown reader {clip.reader!r}")
    if clip.fps:
        dec.fps = float(clip.fps)
    if clip.seg is not None:
        dec.seg, dec.seg_frames = load_seg(clip.seg, dec.frames.shape[:3], clip.source)
    return dec


def load_seg(spec: SegSpec, shape: tuple[int, int, int], source: str) -> tuple[np.ndarray, list[int]]:
    """Label maps uint8 [F, H, W] matching the video `shape` (F, H, W), and annotated frames."""
    from ..errors import DataError

    f, h, w = shape
    if spec.kind == "npy":
        try:
            seg = np.load(spec.path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{spec.path}: cannot read mask ({e})") from e
    elif spec.kind == "nifti":
        from .camus import read_nifti_labels

        seg = read_nifti_labels(spec.path)
    else:
        import cv2

        seg = np.zeros((f, h, w), np.uint8)
        for t, pts in spec.polygons.items():
            if 0 <= t < f and len(pts) >= 3:
                # fillPoly wants integer vertices; 4 bits of sub-pixel shift keeps tracing precision.
                p = np.round(np.asarray(pts, np.float64) * 16).astype(np.int32)
                cv2.fillPoly(seg[t], [p], 1, lineType=cv2.LINE_8, shift=4)
    if seg.ndim != 3 or tuple(seg.shape) != (f, h, w):
        raise DataError(f"{spec.path or source}: mask shape {tuple(seg.shape)} does not match video "
                        f"{(f, h, w)} (frames, height, width)")
    seg = seg.astype(np.uint8, copy=False)
    if spec.frames is not None:
        frames = sorted({int(t) for t in spec.frames if 0 <= int(t) < f})
    else:
        frames = [int(t) for t in np.flatnonzero(seg.reshape(f, -1).max(1) > 0)]
    return seg, frames


VIDEO_EXTS = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".m4v")


def reader_for(path: str | Path) -> Literal["video", "dicom", "nifti"]:
    """Pick the decoder from the file name (DICOM files often have no extension)."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(VIDEO_EXTS):
        return "video"
    return "dicom"


def safe_name(s: str, max_len: int = 48) -> str:
    """Keep [A-Za-z0-9-] (underscore separates key parts), collapse the rest to '-'."""
    import re

    out = re.sub(r"[^A-Za-z0-9-]+", "-", s).strip("-")
    return out[:max_len]
