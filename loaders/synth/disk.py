"""A corpus on disk: render and write every planned clip, and the labels.csv that lists
them (written and read here, nowhere else).

Layout: DIR/videos/NAME.{mp4,avi,dcm}, DIR/masks/NAME.npy (uint8 [F, H, W]),
DIR/labels.csv with the columns of `LABEL_COLUMNS` (ed/es as ';'-joined frame indices).
"""
from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .phantom import render_clip
from .plan import CONTAINERS, ClipSpec, SynthConfig, plan_corpus
from .write import write_dicom, write_video

LABEL_COLUMNS = ("file", "patient", "study", "view", "ef", "period", "ed", "es", "grade", "split",
                 "mask", "fps", "frames")
_INT_COLUMNS = ("period", "grade", "fps", "frames")


def _make_one(job: tuple[str, ClipSpec]) -> dict:
    """Render one clip and write its video + mask; returns its labels row."""
    out_dir, spec = Path(job[0]), job[1]
    clip = render_clip(spec)
    rel_video = f"videos/{spec.name}.{spec.container}"
    rel_mask = f"masks/{spec.name}.npy"
    if spec.container == "dcm":
        write_dicom(out_dir / rel_video, clip.video, fps=spec.fps, patient=spec.patient,
                    study=spec.study, name=spec.name, seed=spec.seed)
    else:
        write_video(out_dir / rel_video, clip.video, spec.fps, spec.container)
    np.save(out_dir / rel_mask, clip.masks)
    return {"file": rel_video, "patient": spec.patient, "study": spec.study, "view": spec.view,
            "ef": spec.ef, "period": spec.period, "ed": clip.ed, "es": clip.es, "grade": spec.grade,
            "split": spec.split, "mask": rel_mask, "fps": spec.fps, "frames": spec.frames}


def _csv_value(v) -> str:
    if isinstance(v, list):
        return ";".join(str(i) for i in v)
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def make_corpus(out_dir: str | Path, cfg: SynthConfig) -> list[dict]:
    """Write `cfg.videos` clips under `out_dir` (videos/, masks/, labels.csv).

    Returns the labels rows as dicts keyed by `LABEL_COLUMNS` (ef float, ed/es int lists,
    period/grade/fps/frames int). Output depends only on `cfg` minus `workers`.
    """
    specs = plan_corpus(cfg)
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), s) for s in specs]
    if cfg.workers > 1:
        # spawn: safe even when the caller has threads (torch, DALI) running
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_make_one, jobs, chunksize=1))
    else:
        rows = [_make_one(j) for j in jobs]
    tmp = out_dir / "labels.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(LABEL_COLUMNS)
        for row in rows:
            wr.writerow([_csv_value(row[k]) for k in LABEL_COLUMNS])
    os.replace(tmp, out_dir / "labels.csv")
    return rows


def read_labels(path: str | Path) -> list[dict]:
    """Parse a labels.csv (or the directory holding it) back into typed rows."""
    path = Path(path)
    if path.is_dir():
        path = path / "labels.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows, start=2):
        missing = [k for k in LABEL_COLUMNS if k not in row]
        if missing:
            raise ValueError(f"{path}:{i}: missing column(s) {', '.join(missing)}")
        row["ef"] = float(row["ef"])
        for k in _INT_COLUMNS:
            row[k] = int(row[k])
        for k in ("ed", "es"):
            row[k] = [int(i) for i in row[k].split(";") if i]
    return rows


def summarize(rows: list[dict]) -> Iterator[str]:
    """Human-readable lines describing a corpus (for the CLI)."""
    def count(key):
        vals = sorted({str(r[key]) for r in rows})
        return ", ".join(f"{v} {sum(str(r[key]) == v for r in rows)}" for v in vals)

    frames = [r["frames"] for r in rows]
    yield (f"{len(rows)} clips, {len({r['patient'] for r in rows})} patients, "
           f"{len({r['study'] for r in rows})} studies, {sum(frames)} frames "
           f"(clip length {min(frames)}-{max(frames)}, {sum(f < 32 for f in frames)} shorter than 32)")
    yield f"views: {count('view')}"
    yield "containers: " + ", ".join(
        f"{ext} {sum(r['file'].endswith('.' + ext) for r in rows)}" for ext in CONTAINERS)
    yield f"grades: {count('grade')}; splits: {count('split')}"
    efs = [r["ef"] for r in rows]
    periods = [r["period"] for r in rows]
    fps = [r["fps"] for r in rows]
    yield (f"EF {min(efs):.1f}-{max(efs):.1f}%, period {min(periods)}-{max(periods)} frames, "
           f"fps {min(fps)}-{max(fps)}")
