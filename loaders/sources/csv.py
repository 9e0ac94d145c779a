"""CSV manifest adapter: one row per clip, a path column plus any label columns.

Recognised columns (case-insensitive): the path (`path`, `file`, `filename`, `video`;
relative paths resolve against the CSV's folder), `patient`, `study` (the exam; hashed with
the patient; absent: one study per patient), `split`, `view`, `mask`
(a uint8 [F, H, W] `.npy`), `fps`. `period`, `ed`, `es` are the source's ground truth and
become labels `period_true`, `ed_true`, `es_true` (ingest measures the cycle itself).
`frames` is ignored (ingest counts decoded frames). Every other non-empty column is a
label: numbers become int or float, anything else stays a string. `grade` is an int.

Videos and DICOM files under the CSV's folder that no row lists are reported (not ingested:
they have no labels); run ingest on the folder without the CSV to take them as plain files.

The synthetic corpus' `labels.csv` (CONTRACTS.md) ingests through this adapter.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import DataError
from .base import Clip, Discovery, SegSpec, reader_for, safe_name

PATH_COLUMNS = ("path", "file", "filename", "video")


def _number(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _indices(v: str) -> list[int]:
    return [int(float(x)) for x in v.replace(",", ";").split(";") if x.strip()]


def discover(csv_path: str | Path, dataset: str | None = None) -> Discovery:
    """Clips of a CSV manifest (or of `<dir>/labels.csv` when given a directory), and the
    videos in its folder that it does not list."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / "labels.csv"
    root = csv_path.parent
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read CSV manifest ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text at byte {e.start} (save the CSV manifest as UTF-8)") from None
    if not rows:
        raise DataError(f"{csv_path}: CSV manifest has no rows")
    cols = {c.lower().strip(): c for c in rows[0].keys() if c}
    path_col = next((cols[c] for c in PATH_COLUMNS if c in cols), None)
    if path_col is None:
        raise DataError(f"{csv_path}: no path column (one of {', '.join(PATH_COLUMNS)}); "
                        f"columns are {', '.join(rows[0].keys())}")
    ds = dataset or safe_name(root.resolve().name) or "csv"
    special = {path_col, *(cols.get(c) for c in ("patient", "study", "split", "view", "mask", "fps", "frames"))}
    clips = []
    for i, row in enumerate(rows, start=2):
        rel = (row.get(path_col) or "").strip()
        if not rel:
            raise DataError(f"{csv_path}:{i}: empty {path_col!r}")
        src = Path(rel) if Path(rel).is_absolute() else root / rel
        labels = {}
        for c, v in row.items():
            if c in special or c is None or v is None or not v.strip():
                continue
            lc = c.lower().strip()
            if lc in ("ed", "es"):
                labels[f"{lc}_true"] = _indices(v)
            elif lc == "period":
                labels["period_true"] = _number(v.strip())
            elif lc == "grade":
                labels["grade"] = int(float(v))
            else:
                labels[lc] = _number(v.strip())
        get = lambda name: (row.get(cols[name]) or "").strip() if name in cols else ""  # noqa: E731
        mask = get("mask")
        fps = get("fps")
        clips.append(Clip(
            source=str(src), rel_source=rel, reader=reader_for(src), dataset=ds,
            patient=get("patient") or Path(rel).stem, study=get("study"), dataset_from_path=dataset is None,
            split=get("split").lower() or None, view=get("view") or None, labels=labels,
            fps=float(fps) if fps else None,
            seg=SegSpec(kind="npy", path=str(root / mask)) if mask else None))
    return Discovery(clips=clips, unlisted=_unlisted(root, clips))


def _unlisted(root: Path, clips: list[Clip]) -> list[str]:
    """Relative paths of the videos / DICOM files under root that no clip names."""
    from .files import discover as files_discover

    listed = {Path(c.source).resolve() for c in clips}
    listed |= {Path(c.seg.path).resolve() for c in clips if c.seg is not None and c.seg.path}
    found = files_discover(root)
    return sorted(c.rel_source for c in found.clips if Path(c.source).resolve() not in listed)
