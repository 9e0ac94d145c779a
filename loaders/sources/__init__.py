"""Source adapters: one per input layout (files, DICOM, EchoNet-Dynamic, CAMUS, CSV).

`discover(path)` recognises the layout and returns a `Discovery` (the adapter's `Clip`s and
the files it saw but does not ingest as listed):
a `.csv` file or a folder with `labels.csv` -> CSV manifest; a folder with `FileList.csv`
-> EchoNet-Dynamic; a folder of `patientNNNN/` with `*_half_sequence.nii.gz` -> CAMUS;
anything else -> video files and DICOM files found under it (or the one file given).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .base import Clip, Decoded, Discovery, SegSpec
from .load import load_clip

__all__ = ["Clip", "Decoded", "Discovery", "SegSpec", "discover", "load_clip"]


def discover(path: str | Path, dataset: str | None = None) -> Discovery:
    """What one source argument (file or folder) holds, by layout."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: source does not exist")
    if p.is_file() and p.suffix.lower() == ".csv":
        from . import csv

        return csv.discover(p, dataset)
    if p.is_dir():
        if (p / "labels.csv").is_file():
            from . import csv

            return csv.discover(p / "labels.csv", dataset)
        if (p / "FileList.csv").is_file():
            from . import echonet

            return echonet.discover(p, dataset)
        if any(p.glob("patient*/*_half_sequence.nii.gz")) or any(p.glob("*/patient*/*_half_sequence.nii.gz")):
            from . import camus

            return camus.discover(p, dataset)
    from . import files

    return files.discover(p, dataset)
