"""CAMUS root: `patientNNNN/patientNNNN_{2CH,4CH}_half_sequence[_gt].nii.gz` + `Info_{2CH,4CH}.cfg`.

NIfTI axis order: CAMUS volumes are written by ITK, so nibabel's voxel array is indexed
(x, y, t) = (column, row, frame), shape (W, H, F). We transpose to (F, H, W). A file whose
array is 2-D is one frame. `_gt` label maps: 0 background, 1 LV cavity, 2 myocardium, 3 LA.

Info_*.cfg lines `Key: value`: ED and ES (1-based frame numbers -> 0-based `ed_true` /
`es_true` labels), NbFrame, EF, ImageQuality (Good / Medium / Poor), optional FrameRate.
CAMUS gives no split: patients are hashed into splits by ingest. One exam per patient: the
2CH and 4CH clips of a patient form one study (ingest's rule for sources without a study id).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Clip, Decoded, Discovery, SegSpec

VIEWS = {"2CH": "A2C", "4CH": "A4C"}


def _load(path: str | Path) -> np.ndarray:
    import nibabel as nib

    try:
        a = np.asarray(nib.load(str(path)).dataobj)
    except Exception as e:  # nibabel raises several types on damaged gzip / headers
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 4 and a.shape[2] == 1:  # (x, y, 1, t)
        a = a[:, :, 0]
    if a.ndim != 3:
        raise DataError(f"{path}: expected a (x, y, t) volume, got shape {a.shape}")
    return np.ascontiguousarray(a.transpose(2, 1, 0))


def read_nifti_frames(path: str | Path, short_side: int = 0) -> Decoded:
    """A CAMUS sequence -> grey frames uint8 [F, h, w] (fps 0: NIfTI has none). The volume is
    read whole (CAMUS half sequences are ~10 MB); frames pass through a size-bounded sink."""
    from ..video_io import FrameSink

    a = _load(path)
    if a.dtype != np.uint8:
        hi = float(a.max())
        scale = 255.0 / hi if hi > 255 else 1.0
        a = np.clip(a.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    sink = FrameSink(short_side=short_side)
    for frame in a:
        sink.add(frame)
    return Decoded(frames=sink.result(), fps=0.0, source_size=sink.source_size, scale=sink.scale)


def read_nifti_labels(path: str | Path) -> np.ndarray:
    """A CAMUS `_gt` sequence -> uint8 [F, H, W] labels."""
    return np.rint(_load(path)).astype(np.uint8)


def read_cfg(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def discover(root: str | Path, dataset: str | None = None) -> Discovery:
    root = Path(root)
    ds = dataset or "camus"
    clips = []
    for seq in sorted(root.glob("**/patient*_*_half_sequence.nii.gz")):
        m = re.match(r"(patient\d+)_(2CH|4CH)_half_sequence\.nii\.gz$", seq.name)
        if not m:
            continue
        patient, ch = m.groups()
        cfg_path = seq.parent / f"Info_{ch}.cfg"
        info = read_cfg(cfg_path) if cfg_path.is_file() else {}
        labels = {}
        try:
            if "EF" in info:
                labels["ef"] = float(info["EF"])
            if "ImageQuality" in info:
                labels["image_quality"] = info["ImageQuality"]
            # The half sequence runs from ED to ES: cfg frame numbers are 1-based.
            if "ED" in info:
                labels["ed_true"] = [int(info["ED"]) - 1]
            if "ES" in info:
                labels["es_true"] = [int(info["ES"]) - 1]
            fps = float(info["FrameRate"]) if info.get("FrameRate") else None
        except ValueError as e:
            raise DataError(f"{cfg_path}: bad value ({e})") from e
        gt = seq.with_name(seq.name.replace("_half_sequence.nii.gz", "_half_sequence_gt.nii.gz"))
        clips.append(Clip(
            source=str(seq), rel_source=str(seq.relative_to(root)), reader="nifti", dataset=ds,
            patient=patient, clip_id=ch, view=VIEWS[ch], labels=labels,
            fps=fps, seg=SegSpec(kind="nifti", path=str(gt)) if gt.is_file() else None))
    if not clips:
        raise DataError(f"{root}: no patient*/patient*_{{2CH,4CH}}_half_sequence.nii.gz files")
    return Discovery(clips=clips)
