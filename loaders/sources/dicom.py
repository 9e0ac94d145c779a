"""DICOM ultrasound cines (multi-frame; single frames too) via pydicom (+ pillow for JPEG).

Photometric interpretations: MONOCHROME1/2 (grey -> 3 equal channels; MONOCHROME1 is
inverted), RGB, YBR_FULL / YBR_FULL_422 (pydicom's `pixel_array` converts YBR to RGB),
PALETTE COLOR (through its LUT). More than 8 bits are scaled to 8. Grey stays one channel. Frame rate from
FrameTime (ms), else CineRate, else RecommendedDisplayFrameRate, else FrameTimeVector.
The patient is PatientID, the study StudyInstanceUID (both hashed by ingest; neither
reaches a key or json in clear).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Clip, Decoded


def dicom_fps(ds) -> float:
    """Frames per second from the cine timing attributes; 0.0 when none is present."""
    try:
        ft = float(ds.get("FrameTime", 0) or 0)
        if ft > 0:
            return 1000.0 / ft
        for tag in ("CineRate", "RecommendedDisplayFrameRate"):
            v = float(ds.get(tag, 0) or 0)
            if v > 0:
                return v
        ftv = ds.get("FrameTimeVector")
        if ftv is not None and len(ftv) > 1:
            dt = float(np.mean([float(x) for x in list(ftv)[1:]]))
            if dt > 0:
                return 1000.0 / dt
    except (TypeError, ValueError):
        pass
    return 0.0


def to_frames(arr: np.ndarray, ds, levels: tuple[float, float] | None = None, one_frame: bool = False) -> np.ndarray:
    """pixel_array (or one frame of it: one_frame) -> uint8 [F, H, W] grey (MONOCHROME) or
    [F, H, W, 3] RGB. More than 8 bits map `levels` (lo, hi) to 0..255; None: the 0.5 / 99.5
    percentiles of `arr`."""
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = int(ds.get("SamplesPerPixel", 1))
    nframes = 1 if one_frame else int(ds.get("NumberOfFrames", 1) or 1)
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        spp = 3
    if spp == 1 and (arr.ndim == 2 or (arr.ndim == 3 and nframes == 1)):
        arr = arr.reshape((1,) + arr.shape[-2:])
    elif spp == 3 and arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float32)
        lo, hi = levels if levels is not None else np.percentile(a, [0.5, 99.5])
        arr = np.clip((a - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    if pi == "MONOCHROME1":
        arr = 255 - arr
    return np.ascontiguousarray(arr)


def read_dicom(path: str | Path, short_side: int = 0) -> Decoded:
    """Decode a DICOM file frame by frame (pydicom's iter_pixels) through a size-bounded sink;
    raises DataError naming the file when it cannot. Deeper than 8 bits: the first frame's
    0.5 / 99.5 percentiles set the grey levels for the whole cine."""
    import pydicom
    from pydicom.pixels import iter_pixels

    from ..video_io import FrameSink

    sink, levels = FrameSink(short_side=short_side), None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        if "Rows" not in ds:
            raise DataError(f"{path}: DICOM has no pixel data")
        for arr in iter_pixels(str(path)):
            if arr.dtype != np.uint8 and levels is None:
                levels = tuple(np.percentile(arr.astype(np.float32), [0.5, 99.5]))
            for frame in to_frames(arr, ds, levels, one_frame=True):
                sink.add(frame)
    except DataError:
        raise
    except Exception as e:  # pydicom raises many types on damaged/unsupported files
        raise DataError(f"{path}: cannot decode DICOM pixels ({type(e).__name__}: {e})") from e
    if not sink.frames:
        raise DataError(f"{path}: DICOM has no frames")
    return Decoded(frames=sink.result(), fps=dicom_fps(ds), source_size=sink.source_size, scale=sink.scale)


def discover_files(paths: list[Path], base: Path, dataset: str, from_path: bool = False) -> list[Clip]:
    """Clips for DICOM files (headers only; `files.discover` finds them in folders). Files without image rows (DICOMDIR, SR) are
    skipped; unreadable headers still become clips, so the worker records them as rejects."""
    import pydicom

    clips = []
    for q in paths:
        patient, view, study = q.stem, None, ""
        try:
            ds = pydicom.dcmread(str(q), stop_before_pixels=True)
            if "Rows" not in ds:
                continue
            patient = str(ds.get("PatientID", "") or "") or f"unknown-{q.stem}"
            view = str(ds.get("ViewName", "") or "") or None
            study = str(ds.get("StudyInstanceUID", "") or "")
        except Exception:  # damaged header: let the worker reject it with the reason
            pass
        clips.append(Clip(source=str(q), rel_source=str(q.relative_to(base)), reader="dicom",
                          dataset=dataset, patient=patient, study=study, view=view,
                          dataset_from_path=from_path))
    return clips

