"""Downstream metrics against hand-computed values; bootstrap resamples whole patients."""
import math

import numpy as np
import pytest

from echofm.engine.downstream import metrics as task_metrics


def test_accuracy_and_macro_f1_by_hand():
    assert task_metrics.accuracy(np.array([0, 1, 2, 1]), np.array([0, 2, 2, 1])) == 0.75
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2: tp 1, fn 1 -> 2/3
    assert task_metrics.macro_f1(y, pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-12)
    # A class nobody has and nobody predicts is left out of the mean.
    assert task_metrics.macro_f1(y, pred, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-12)
    cm = task_metrics.confusion_matrix(y, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_auroc_with_ties_by_hand():
    pos = np.array([1, 1, 0, 0, 0], bool)
    score = np.array([0.9, 0.4, 0.5, 0.1, 0.4])
    # 0.9 beats all 3 negatives; 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.5 -> 4.5 / 6
    assert task_metrics.auroc(pos, score) == pytest.approx(0.75, abs=1e-12)
    assert math.isnan(task_metrics.auroc(np.ones(3, bool), np.arange(3.0)))
    assert task_metrics.auroc(pos, -score) == pytest.approx(0.25, abs=1e-12)


def test_macro_auroc_by_hand():
    y = np.array([0, 1, 2, 0])
    prob = np.array([[0.8, 0.1, 0.1],
                     [0.3, 0.6, 0.1],
                     [0.2, 0.3, 0.5],
                     [0.4, 0.5, 0.1]])
    # class 0: pos {0.8, 0.4} vs neg {0.3, 0.2}: 4/4 = 1
    # class 1: pos {0.6} vs neg {0.1, 0.3, 0.5}: 3/3 = 1
    # class 2: pos {0.5} vs neg {0.1, 0.1, 0.1}: 1
    assert task_metrics.macro_auroc(y, prob) == pytest.approx(1.0)
    prob[3] = [0.1, 0.7, 0.2]
    # class 0: pos {0.8, 0.1} vs neg {0.3, 0.2}: 0.8 wins 2, 0.1 wins 0 -> 2/4
    # class 1: pos {0.6} vs neg {0.1, 0.3, 0.7}: 2/3;  class 2: pos {0.5} vs {0.1, 0.1, 0.2}: 1
    assert task_metrics.macro_auroc(y, prob) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3, abs=1e-12)


def test_regression_metrics_by_hand():
    y = np.array([50.0, 60.0, 30.0, 40.0])
    pred = np.array([55.0, 58.0, 35.0, 40.0])
    assert task_metrics.mae(y, pred) == pytest.approx(3.0)
    assert task_metrics.rmse(y, pred) == pytest.approx(math.sqrt(54 / 4))
    # mean 45: SS_tot = 25 + 225 + 225 + 25 = 500; SS_res = 25 + 4 + 25 + 0 = 54
    assert task_metrics.r2(y, pred) == pytest.approx(1 - 54 / 500)
    assert math.isnan(task_metrics.r2(np.ones(3), np.arange(3.0)))


def test_dice_per_frame_by_hand():
    target = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros((2, 4, 4), np.uint8)
    target[0, :2, :2] = 1       # 4 px LV
    pred[0, :2, :3] = 1         # 6 px LV, 4 overlap -> 8 / 10
    target[0, 3, :] = 3         # 4 px LA
    pred[0, 3, :2] = 3          # 2 px LA, 2 overlap -> 4 / 6
    pred[1, 0, 0] = 1           # LV false positive on a frame with no LV -> 0; no LA anywhere -> NaN
    d = task_metrics.dice_per_frame(pred, target, [1, 3])
    assert d[0].tolist() == pytest.approx([0.8, 2 / 3])
    assert d[1, 0] == 0.0 and math.isnan(d[1, 1])


def test_bootstrap_resamples_whole_patients():
    # Patient a: two rows of 1, patient b: two rows of 0. Resampling patients gives means
    # 0, 0.5 or 1 only (row resampling would also give 0.25, 0.75).
    values = np.array([1.0, 1.0, 0.0, 0.0])
    patients = ["a", "a", "b", "b"]
    seen = []

    def metric(rows):
        assert len(rows) == 4 and np.all(np.bincount(rows, minlength=4)[[0, 2]] == np.bincount(rows, minlength=4)[[1, 3]])
        seen.append(values[rows].mean())
        return values[rows].mean()

    lo, hi = task_metrics.bootstrap_ci(metric, patients, samples=400, ci=0.9, seed=3)
    assert set(np.round(seen, 6)) <= {0.0, 0.5, 1.0} and len(set(seen)) == 3
    assert (lo, hi) == (0.0, 1.0)  # P(0) = P(1) = 1/4 > 5%
    # Same seed, same interval; NaN resamples (AUROC of one class) are dropped.
    assert task_metrics.bootstrap_ci(metric, patients, samples=400, ci=0.9, seed=3) == (lo, hi)
    pos = np.array([True, True, False, False])
    lo, hi = task_metrics.bootstrap_ci(lambda r: task_metrics.auroc(pos[r], values[r]), patients, samples=200, seed=0)
    assert (lo, hi) == (1.0, 1.0)
    res = task_metrics.with_ci({"mean": lambda r: values[r].mean()}, patients, samples=0, ci=0.95, seed=0)
    assert res["mean"]["value"] == 0.5 and math.isnan(res["mean"]["ci_low"])
