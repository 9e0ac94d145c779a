"""Plain files: a video file, a DICOM file, or a folder searched recursively for both.

Videos: mp4, avi, webm, mov, mkv, m4v (any codec PyAV reads). The patient is the file's
stem (a folder of loose videos carries no patient identity; use a CSV manifest with a
`patient` column when clips share patients). DICOM files (`.dcm`, or any extension-less
file starting with the DICM preamble) go through the DICOM adapter.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import VIDEO_EXTS, Clip, safe_name


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def discover(path: str | Path, dataset: str | None = None) -> list[Clip]:
    root = Path(path)
    paths = [root] if root.is_file() else sorted(q for q in root.rglob("*") if q.is_file())
    base = root.parent if root.is_file() else root
    ds = dataset or safe_name(base.resolve().name) or "files"
    clips, dicoms = [], []
    for q in paths:
        if q.suffix.lower() in VIDEO_EXTS:
            rel = str(q.relative_to(base))
            clips.append(Clip(source=str(q), rel_source=rel, reader="video", dataset=ds,
                              patient=q.stem))
        elif is_dicom(q):
            dicoms.append(q)
    if dicoms:
        from .dicom import discover_files

        clips += discover_files(dicoms, base, ds)
    if not clips and root.is_file():
        raise DataError(f"{root}: not a video ({', '.join(VIDEO_EXTS)}), DICOM, or CSV file")
    return clips
