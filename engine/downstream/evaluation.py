"""Score a split: head outputs -> one prediction per video (its clips' scores averaged) or,
with `downstream.level: study`, per study (the mean logits / EF of the study's clips of the
views the task uses) -> metrics with patient-bootstrap CIs -> PNGs. Shared by probe,
fine-tune and `evaluate`.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from echofm.loaders.errors import DataError

from . import metrics as task_metrics
from . import plots
from .data import patient_of
from .features import FeatureSet
from .tasks import SegTask, Task

MIN_CI_PATIENTS = 10
"""Fewer patients than this under a bootstrap CI earn a warning: the interval says little."""


@torch.no_grad()
def video_predictions(task: Task, head, fs: FeatureSet, *, batch: int = 4096):
    """One prediction per unit of `task.cfg.level` -> (keys [V] (sample keys, or study
    hashes), y [V], scores float64 [V, C], patients [V]); units without a label for the task
    (or without a clip of the views it uses) are left out.

    video: the clips' scores (probabilities / EF) averaged; study: the head's raw outputs
    (logits / EF) averaged over every clip of the study, then turned into scores."""
    head = head.eval().cpu()
    study = task.cfg.level == "study"
    outs = [head(fs.feats[i:i + batch]) for i in range(0, len(fs.feats), batch)]
    raw = torch.cat(outs).float() if outs else torch.zeros(0, task.out_dim)
    per_clip = (raw if study else task.to_scores(raw)).double()
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, m in enumerate(fs.metas):
        if task.target(m) is not None:
            groups.setdefault(study_of(m) if study else str(m.get("key", i)), []).append(i)
    keys, ys, sc, pats = [], [], [], []
    for k, rows in groups.items():
        keys.append(k)
        ys.append(_unit_label(task, [fs.metas[r] for r in rows], k))
        pooled = per_clip[rows].mean(0, keepdim=True)
        sc.append((task.to_scores(pooled) if study else pooled)[0].double().numpy())
        pats.append(patient_of(fs.metas[rows[0]]))
    scores = np.asarray(sc).reshape(len(keys), -1) if keys else np.zeros((0, per_clip.shape[1]))  # none labelled
    return keys, np.asarray(ys), scores, pats


def study_of(meta: dict) -> str:
    """The sample's study hash; DataError for shards written before ingest recorded studies."""
    s = meta.get("study")
    if not s:
        raise DataError(f"sample {meta.get('key')}: no 'study' in its json (shards from an ingest before "
                        "studies were recorded): re-ingest, or set downstream.level=video")
    return str(s)


def _unit_label(task: Task, metas: list[dict], unit: str):
    """The label of a video or study: its clips' (a study's videos share one EF and grade;
    EF values that differ are averaged, classes that differ are an error naming the study)."""
    ys = [task.target(m) for m in metas]
    if task.kind == "regression":
        return float(np.mean(ys))
    if len(set(ys)) > 1:
        raise DataError(f"study {unit}: its videos disagree on label '{task.key}' "
                        f"({sorted({task.classes[y] for y in ys})}); one study-level prediction needs one label")
    return ys[0]


def score_video_task(task: Task, head, fs: FeatureSet, *, png: str | Path | None = None,
                     title: str = "", bootstrap: int | None = None,
                     csv_path: str | Path | None = None) -> dict:
    """Metrics of one split for view / grade / ef; writes the split's PNG when `png` and
    one row per video or study (downstream.level: key or study, patient, label, prediction,
    scores) when `csv_path`."""
    keys, y, scores, patients = video_predictions(task, head, fs)
    unit = task.cfg.level
    if not keys:
        views = f" of views {task.cfg.views}" if task.cfg.views else ""
        raise DataError(f"no labelled {unit}s{views} for task {task.name!r} (label '{task.key}'): score shards "
                        "ingested with that label (e.g. a CSV manifest with the column)")
    if csv_path is not None:
        write_predictions(csv_path, task, keys, patients, y, scores, unit=unit)
    res = task.evaluate(y, scores, patients, bootstrap=bootstrap)
    used = [m for m in fs.metas if task.target(m) is not None]
    res["videos"], res["patients"], res["clips"] = len({m.get("key") for m in used}), len(set(patients)), len(used)
    if unit == "study":
        res["studies"] = len(keys)
    if png is not None:
        if task.kind == "classification":
            plots.confusion_png(np.asarray(res["confusion_matrix"]), task.classes, png, title)
        else:
            plots.ef_png(y, scores[:, 0], png, title)
    return res


@torch.no_grad()
def seg_predictions(task: SegTask, decoder, fs: FeatureSet, *, batch: int = 4):
    """-> (dice float [F, S] over annotated frames, patients [F], first predictions int64
    [n, T, H, W] for overlays)."""
    decoder = decoder.eval().cpu()
    labels = list(range(1, len(task.cfg.seg_labels) + 1))
    dice, pats, first = [], [], []
    for i in range(0, len(fs.feats), batch):
        pred = decoder(fs.feats[i:i + batch]).argmax(1)                  # [b, T, H, W]
        target = task.remap(fs.seg[i:i + batch])
        if len(first) < 1:
            first.append(pred)
        for j in range(pred.shape[0]):
            v = fs.valid[i + j]
            if v.any():
                dice.append(task_metrics.dice_per_frame(pred[j][v].numpy(), target[j][v].numpy(), labels))
                pats += [patient_of(fs.metas[i + j])] * int(v.sum())
    dice = np.concatenate(dice) if dice else np.zeros((0, len(labels)))
    return dice, pats, torch.cat(first) if first else None


def score_seg_task(task: SegTask, decoder, fs: FeatureSet, *, png: str | Path | None = None) -> dict:
    dice, patients, pred = seg_predictions(task, decoder, fs)
    if len(dice) == 0:
        raise DataError("no annotated frames in the segmentation split (json 'seg_frames')")
    res = task.evaluate(dice, patients)
    res["patients"], res["clips"] = len(set(patients)), len(fs.metas)
    if png is not None and fs.frames is not None and pred is not None:
        # The first clip: up to 4 annotated frames.
        v = fs.valid[0].nonzero().flatten()[:4]
        if len(v):
            plots.seg_overlay_png(fs.frames[0][v].numpy(), task.remap(fs.seg[0][v]).numpy(),
                                  pred[0][v].numpy(), png, task.cfg.seg_names)
    return res


def ci_warning(split: str, res: dict, bootstrap: int) -> str | None:
    """A warning when the split's bootstrap CIs rest on fewer than MIN_CI_PATIENTS patients."""
    n = res.get("patients", 0)
    if not bootstrap or n >= MIN_CI_PATIENTS:
        return None
    return (f"split '{split}': the confidence intervals rest on {n} patient(s) (fewer than {MIN_CI_PATIENTS}); "
            "they are not a reliable range: score more patients")


def score(task: Task, head, fs: FeatureSet, *, png=None, title: str = "", csv_path=None) -> dict:
    if isinstance(task, SegTask):
        return score_seg_task(task, head, fs, png=png)
    return score_video_task(task, head, fs, png=png, title=title, csv_path=csv_path)


def write_predictions(path: str | Path, task: Task, keys: list[str], patients: list[str],
                      y: np.ndarray, scores: np.ndarray, *, unit: str = "video") -> None:
    """CSV, one row per video (first column `key`) or study (first column `study`): patient,
    true label, prediction (class name or EF), then the scores."""
    import csv

    first = "key" if unit == "video" else "study"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if task.kind == "classification":
            w.writerow([first, "patient", "label", "pred", *[f"p_{c}" for c in task.classes]])
            for k, p, t, s in zip(keys, patients, y, scores):
                w.writerow([k, p, task.classes[int(t)], task.classes[int(s.argmax())], *[f"{v:.6f}" for v in s]])
        else:
            w.writerow([first, "patient", "label", "pred"])
            for k, p, t, s in zip(keys, patients, y, scores):
                w.writerow([k, p, f"{float(t):.6f}", f"{float(s[0]):.6f}"])
