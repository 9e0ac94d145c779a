"""Task metrics in float64 numpy, and bootstrap confidence intervals over patients.

Every function takes plain arrays (one row per video, or per annotated frame for Dice)
so the tests can check them against hand-computed values. AUROC is the Mann-Whitney
statistic with average ranks for ties (equal to the trapezoidal ROC area).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """y, pred: int [N] class indices."""
    y, pred = np.asarray(y), np.asarray(pred)
    return float(np.mean(y == pred)) if len(y) else float("nan")


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y or pred.

    A class that neither occurs nor is predicted has no F1 and is left out (as
    scikit-learn does with `labels=` the union of both)."""
    y, pred = np.asarray(y), np.asarray(pred)
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2.0 * tp / (2.0 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: rows true class, columns predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    return ((ends - counts + 1.0 + ends) / 2.0)[inverse]


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC. positive: bool [N]; score: float [N], higher = more positive.
    NaN when only one class is present."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(y: np.ndarray, prob: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes that have positives and negatives in y.
    y: int [N]; prob: float [N, C]."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=np.float64)
    vals = [auroc(y == c, prob[:, c]) for c in range(prob.shape[1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(y, np.float64))))


def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - np.asarray(y, np.float64)) ** 2)))


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (NaN when y is constant)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    ss_tot = np.sum((y - y.mean()) ** 2)
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - np.sum((y - pred) ** 2) / ss_tot)


def dice_per_frame(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Dice of each structure on each frame.

    pred, target: int [F, H, W] label maps (same label values). Returns float64 [F, S]
    for the S `labels`; NaN where the structure is absent from both maps (no evidence
    either way, left out of the means)."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = np.full((pred.shape[0], len(labels)), np.nan)
    for s, lab in enumerate(labels):
        p = (pred == lab).reshape(pred.shape[0], -1)
        t = (target == lab).reshape(target.shape[0], -1)
        inter = (p & t).sum(1).astype(np.float64)
        denom = (p.sum(1) + t.sum(1)).astype(np.float64)
        ok = denom > 0
        out[ok, s] = 2.0 * inter[ok] / denom[ok]
    return out


# ---------------------------------------------------------------- bootstrap


def bootstrap_ci(metric: Callable[[np.ndarray], float], patients: Sequence[str], *,
                 samples: int = 1000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of `metric` under resampling PATIENTS with replacement.

    metric: takes int row indices [M] (rows of the chosen patients, repeated as often as
    the patient was drawn) and returns a float. patients: [N] patient id of each row.
    Resamples whose metric is NaN (e.g. AUROC with one class) are dropped. Returns
    (lo, hi), NaN when `samples` is 0 or no resample gives a number."""
    if samples <= 0 or len(patients) == 0:
        return float("nan"), float("nan")
    ids, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(samples):
        pick = rng.integers(0, len(ids), size=len(ids))
        v = metric(np.concatenate([rows_of[i] for i in pick]))
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(np.asarray(vals), [a, 1.0 - a])
    return float(lo), float(hi)


def with_ci(metrics: dict[str, Callable[[np.ndarray], float]], patients: Sequence[str], *,
            samples: int, ci: float, seed: int) -> dict[str, dict[str, float]]:
    """Each metric on all rows plus its patient-bootstrap CI:
    {name: {"value", "ci_low", "ci_high"}}."""
    everything = np.arange(len(patients))
    out = {}
    for k, (name, fn) in enumerate(metrics.items()):
        lo, hi = bootstrap_ci(fn, patients, samples=samples, ci=ci, seed=seed + k)
        out[name] = {"value": fn(everything), "ci_low": lo, "ci_high": hi}
    return out
