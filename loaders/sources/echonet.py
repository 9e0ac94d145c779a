"""EchoNet-Dynamic root: FileList.csv, VolumeTracings.csv, Videos/*.avi.

- FileList.csv: FileName (with or without `.avi`), EF, ESV, EDV, FrameHeight, FrameWidth,
  FPS, NumberOfFrames, Split (TRAIN / VAL / TEST). EchoNet has no patient ids: each video
  is its own patient, with one study.
- VolumeTracings.csv: FileName (with `.avi`), X1, Y1, X2, Y2, Frame. Per traced frame the
  first row is the LV long axis, the rest are chords across the cavity; the LV polygon is
  the chords' (X1, Y1) ends in order, then their (X2, Y2) ends in reverse (as the
  EchoNet-Dynamic reference code builds it). Two frames per video: the larger traced area
  is end-diastole, the smaller end-systole -> labels `ed_true` / `es_true`; the polygons
  become LV cavity masks (label 1) on those frames.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Clip, Discovery, SegSpec


def _polygon_area(pts: list[tuple[float, float]]) -> float:
    x, y = np.asarray(pts, np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def read_tracings(path: Path) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """VolumeTracings.csv -> {video stem: {frame: LV polygon [(x, y), ...]}}."""
    rows: dict[str, dict[int, list[tuple[float, ...]]]] = defaultdict(lambda: defaultdict(list))
    try:
        with open(path, newline="") as f:
            for i, r in enumerate(csv.DictReader(f), start=2):
                try:
                    stem = Path(r["FileName"].strip()).stem
                    rows[stem][int(float(r["Frame"]))].append(
                        (float(r["X1"]), float(r["Y1"]), float(r["X2"]), float(r["Y2"])))
                except (KeyError, ValueError) as e:
                    raise DataError(f"{path}:{i}: bad tracing row ({e}); need FileName, X1, Y1, X2, Y2, Frame") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    out = {}
    for stem, frames in rows.items():
        out[stem] = {}
        for t, lines in frames.items():
            chords = lines[1:]  # first line = long axis
            if len(chords) >= 2:
                out[stem][t] = [(c[0], c[1]) for c in chords] + [(c[2], c[3]) for c in reversed(chords)]
    return out


def discover(root: str | Path, dataset: str | None = None) -> Discovery:
    root = Path(root)
    fl = root / "FileList.csv"
    try:
        with open(fl, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{fl}: cannot read ({e})") from e
    need = {"FileName", "EF", "ESV", "EDV", "FPS", "Split"}
    if rows and not need <= set(rows[0]):
        raise DataError(f"{fl}: missing column(s) {', '.join(sorted(need - set(rows[0])))}")
    tr_path = root / "VolumeTracings.csv"
    tracings = read_tracings(tr_path) if tr_path.is_file() else {}
    ds = dataset or "echonet"
    clips = []
    for r in rows:
        name = r["FileName"].strip()
        stem = Path(name).stem if name.lower().endswith(".avi") else name
        rel = f"Videos/{stem}.avi"
        labels = {}
        for col, key in (("EF", "ef"), ("ESV", "esv"), ("EDV", "edv")):
            if (r.get(col) or "").strip():
                labels[key] = float(r[col])
        seg = None
        polys = tracings.get(stem, {})
        if polys:
            by_area = sorted(polys, key=lambda t: _polygon_area(polys[t]))
            labels["es_true"], labels["ed_true"] = [by_area[0]], [by_area[-1]]
            seg = SegSpec(kind="polygons", polygons=polys, frames=sorted(polys))
        fps = (r.get("FPS") or "").strip()
        clips.append(Clip(source=str(root / rel), rel_source=rel, reader="video", dataset=ds,
                          patient=stem, split=(r.get("Split") or "").strip() or None,
                          view="A4C", labels=labels, fps=float(fps) if fps else None, seg=seg))
    listed = {c.rel_source for c in clips}
    videos = root / "Videos"
    unlisted = sorted(str(q.relative_to(root)) for q in videos.glob("*") if q.is_file()
                      and str(q.relative_to(root)) not in listed) if videos.is_dir() else []
    return Discovery(clips=clips, unlisted=unlisted)
