"""The four tasks: where each label lives in the sample json, its loss, its metrics.

A task turns a sample's json into a training target (or None: the sample has no label
for this task and is left out), owns the loss on the head's raw output, turns averaged
outputs into predictions, and measures them with bootstrap CIs over patients.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from echofm.loaders.errors import DataError

from ..downstream_config import DownstreamConfig
from . import metrics as task_metrics

DEFAULT_KEYS = {"view": "view", "ef": "ef", "grade": "grade", "seg": "seg"}
GRADE_CLASSES = ["0", "1", "2"]  # none / mild / significant


def _lookup(meta: dict, key: str) -> Any:
    """`key` at the top level of the sample json ('view'), else inside its 'labels'."""
    if key in meta and key != "labels":
        return meta[key]
    return (meta.get("labels") or {}).get(key)


def _class_name(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # grade 1.0 from a CSV is class "1"
    return str(v)


@dataclass(kw_only=True)
class Task(ABC):
    """Common part; `kind` is classification, regression or segmentation."""

    cfg: DownstreamConfig
    name: str
    kind: str
    key: str
    classes: list[str] = field(default_factory=list)

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1

    def stratum(self, meta: dict) -> str | None:
        """Group used to stratify the label-fraction draw (None: unlabelled sample)."""
        y = self.target(meta)
        if y is None:
            return None
        if self.kind == "regression":
            return "reduced" if y < self.cfg.ef_threshold else "normal"
        return str(y) if self.kind == "classification" else "seg"

    @abstractmethod
    def target(self, meta: dict) -> Any:
        """The sample's label in this task's form, or None when it has none."""

    def uses(self, meta: dict) -> bool:
        """The sample's view is one the task uses (downstream.views; empty: every view)."""
        return not self.cfg.views or meta.get("view") in self.cfg.views

    def _n(self, bootstrap: int | None) -> int:
        """Bootstrap resamples: the config's unless overridden (0 while selecting a head)."""
        return self.cfg.bootstrap if bootstrap is None else bootstrap

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "label_key": self.key, "classes": self.classes}


class ClassificationTask(Task):
    """view / grade. Target: class index (int); raw output: logits [B, C]."""

    def target(self, meta: dict) -> int | None:
        if not self.uses(meta):
            return None
        c = _class_name(_lookup(meta, self.key))
        return self.classes.index(c) if c in self.classes else None

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y.long())

    def to_scores(self, out: torch.Tensor) -> torch.Tensor:
        """Per-clip output -> what is averaged over a video's clips: probabilities [B, C]."""
        return out.float().softmax(-1)

    def evaluate(self, y: np.ndarray, scores: np.ndarray, patients: list[str], *,
                 bootstrap: int | None = None) -> dict:
        """y: int [N]; scores: float [N, C] (clip-averaged probabilities)."""
        pred = scores.argmax(1)
        c = len(self.classes)
        res = task_metrics.with_ci({
            "accuracy": lambda i: task_metrics.accuracy(y[i], pred[i]),
            "macro_f1": lambda i: task_metrics.macro_f1(y[i], pred[i], c),
            "macro_auroc": lambda i: task_metrics.macro_auroc(y[i], scores[i]),
        }, patients, samples=self._n(bootstrap), ci=self.cfg.ci, seed=self.cfg.seed)
        res["confusion_matrix"] = task_metrics.confusion_matrix(y, pred, c).tolist()
        return res


class RegressionTask(Task):
    """ef. Target: EF in percent (float); raw output: standardised value [B, 1]."""

    def target(self, meta: dict) -> float | None:
        if not self.uses(meta):
            return None
        v = _lookup(meta, self.key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return None if np.isnan(v) else v

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # out is in standardised units (the head's `raw`), y standardised by the caller.
        return F.smooth_l1_loss(out.float().squeeze(-1), y.float())

    def to_scores(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().reshape(-1, 1)

    def evaluate(self, y: np.ndarray, scores: np.ndarray, patients: list[str], *,
                 bootstrap: int | None = None) -> dict:
        """y: float [N] true EF; scores: float [N, 1] clip-averaged predicted EF."""
        pred = scores[:, 0]
        reduced = y < self.cfg.ef_threshold
        res = task_metrics.with_ci({
            "mae": lambda i: task_metrics.mae(y[i], pred[i]),
            "rmse": lambda i: task_metrics.rmse(y[i], pred[i]),
            "r2": lambda i: task_metrics.r2(y[i], pred[i]),
            # Lower predicted EF = more likely reduced.
            f"auroc_ef_below_{self.cfg.ef_threshold:g}": lambda i: task_metrics.auroc(reduced[i], -pred[i]),
        }, patients, samples=self._n(bootstrap), ci=self.cfg.ci, seed=self.cfg.seed)
        res["bias"] = float(np.mean(pred - y))
        return res


class SegTask(Task):
    """seg. Target: the stream's mask [T, H, W] remapped to 0 bg, 1..S = `seg_labels`."""

    def target(self, meta: dict) -> str | None:
        return "seg" if self.uses(meta) and (meta.get("seg_frames") or meta.get("has_seg")) else None

    def remap(self, mask: torch.Tensor) -> torch.Tensor:
        """uint8 mask values -> int64 class ids (values not in seg_labels become 0)."""
        lut = torch.zeros(256, dtype=torch.long, device=mask.device)
        for i, v in enumerate(self.cfg.seg_labels):
            lut[v] = i + 1
        return lut[mask.long()]

    def loss(self, out: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """out: logits [B, K, T, H, W]; y: int64 [B, T, H, W]; valid: bool [B, T] annotated
        frames. Cross-entropy + soft Dice on annotated frames only."""
        ce = F.cross_entropy(out.float(), y, reduction="none").mean((-1, -2))  # [B, T]
        w = valid.float()
        ce = (ce * w).sum() / w.sum().clamp_min(1)
        prob = out.float().softmax(1)[:, 1:]                                 # [B, S, T, H, W]
        onehot = F.one_hot(y, out.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
        m = w[:, None, :, None, None]
        inter = (prob * onehot * m).sum((0, 2, 3, 4))
        denom = ((prob + onehot) * m).sum((0, 2, 3, 4))
        dice = (2 * inter + 1) / (denom + 1)
        return ce + (1 - dice).mean()

    def evaluate(self, dice: np.ndarray, patients: list[str], *, bootstrap: int | None = None) -> dict:
        """dice: float [F, S] per annotated frame (NaN where a structure is absent);
        patients: [F]."""
        names = self.cfg.seg_names

        def one(s):
            return lambda i: float(np.nanmean(dice[i, s])) if np.isfinite(dice[i, s]).any() else float("nan")

        fns = {f"dice_{n}": one(s) for s, n in enumerate(names)}
        fns["dice_mean"] = lambda i: float(np.nanmean([f(i) for f in list(fns.values())[:len(names)]]))
        res = task_metrics.with_ci(fns, patients, samples=self._n(bootstrap), ci=self.cfg.ci, seed=self.cfg.seed)
        res["frames"] = int(dice.shape[0])
        return res


def make_task(cfg: DownstreamConfig, train_metas: list[dict]) -> Task:
    """Build the task; view classes default to the views present in the training split."""
    key = cfg.label_key or DEFAULT_KEYS[cfg.task]
    if cfg.task == "ef":
        return RegressionTask(cfg=cfg, name="ef", kind="regression", key=key)
    if cfg.task == "seg":
        return SegTask(cfg=cfg, name="seg", kind="segmentation", key=key,
                       classes=["background", *cfg.seg_names])
    classes = [str(c) for c in cfg.classes]
    if not classes and cfg.task == "grade":
        classes = list(GRADE_CLASSES)
    if not classes:
        present = {_class_name(_lookup(m, key)) for m in train_metas if not cfg.views or m.get("view") in cfg.views}
        classes = sorted(c for c in present if c is not None)
    if len(classes) < 2:
        raise DataError(f"task {cfg.task!r}: label '{key}' has {len(classes)} class(es) in the "
                         f"training split ({classes}); need >= 2 (set downstream.label_key or "
                         "downstream.classes)")
    return ClassificationTask(cfg=cfg, name=cfg.task, kind="classification", key=key, classes=classes)
