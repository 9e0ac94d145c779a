"""benchmarks/ablation.py's table on constructed runs with known answers (the seed mean, its
paired differences, the open questions), and the committed results' shape: all three
objectives with at least 3 seeds. (The runs themselves reuse the demo's stages, which
test_demo_e2e.py runs end to end.)"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("bench_ablation", ROOT / "benchmarks" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PATIENTS = ["p1", "p1", "p2", "p2", "p3", "p3"]
Y_VIEW, Y_EF = [0, 1, 2, 0, 1, 2], [30.0, 40.0, 50.0, 60.0, 45.0, 55.0]


def _run(phase_err: float, view_wrong: int, ef_off: float) -> dict:
    """A run: constant per-query phase error; view wrong on the first `view_wrong` videos;
    EF off by `ef_off` everywhere."""
    view = [(y + 1) % 3 if i < view_wrong else y for i, y in enumerate(Y_VIEW)]

    def pv(y, pred):
        return {"per_video": {"key": [f"v{i}" for i in range(6)], "patient": PATIENTS, "y": y, "pred": pred}}

    down = {"view": pv(Y_VIEW, view), "ef": pv(Y_EF, [y + ef_off for y in Y_EF])}
    return {"phase": {"per_query": {"row": list(range(6)), "error": [phase_err] * 6, "patient": PATIENTS}},
            "probe": {"0.1": down}, "finetune": {"0.1": down}}


def test_seed_means_and_paired_differences(ab):
    runs = {"reconstruction": [_run(0.25, 2, 4.0)] * 3,
            "centred": [_run(0.10, 0, 2.0), _run(0.14, 0, 4.0), _run(0.12, 0, 6.0)]}
    random = _run(0.26, 3, 6.0)
    rows = {r["row"]: r for r in ab.table(runs, random, 200)}
    assert list(rows) == ["phase error", "probe 10% view", "probe 10% ef", "finetune 10% view", "finetune 10% ef"]
    ph = rows["phase error"]
    assert ph["centred"]["value"] == pytest.approx(0.12) and ph["centred"]["per_seed"] == pytest.approx([0.10, 0.14, 0.12])
    assert ph["centred"]["ci_low"] == pytest.approx(0.12) == ph["centred"]["ci_high"]  # the same on every patient
    assert ph["centred_vs_random"]["value"] == pytest.approx(-0.14)
    assert ph["centred_vs_random"]["verdict"] == "better beyond noise"
    assert ph["centred_vs_reconstruction"]["value"] == pytest.approx(-0.13)
    ef = rows["probe 10% ef"]
    assert ef["centred"]["value"] == pytest.approx(4.0) and ef["random"]["value"] == pytest.approx(6.0)
    assert ef["centred_vs_reconstruction"]["value"] == pytest.approx(0.0)
    assert ef["centred_vs_reconstruction"]["verdict"] == "within noise"
    view = rows["finetune 10% view"]
    assert view["reconstruction"]["value"] == pytest.approx(4 / 6) and view["random"]["value"] == pytest.approx(0.5)
    assert view["centred_vs_reconstruction"]["value"] == pytest.approx(2 / 6)
    open_rows = ab.open_questions(list(rows.values()))
    assert any(q.startswith("probe 10% ef: centred - reconstruction +0.000") for q in open_rows)
    assert not any(q.startswith("phase error") for q in open_rows)


def test_plot_writes_a_png(ab, tmp_path):
    runs = {"official": [_run(0.27, 1, 5.0)] * 3, "centred": [_run(0.12, 0, 4.0)] * 3}
    rows = ab.table(runs, _run(0.26, 3, 6.0), 50)
    path = ab.plot(rows, list(runs), tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_results_hold_all_three_objectives_with_three_seeds():
    res = json.loads((ROOT / "benchmarks" / "results" / "ablation.json").read_text())
    assert set(res["arms"]) == {"reconstruction", "official", "centred"} and len(res["seeds"]) >= 3
    for row in res["rows"]:
        for arm in res["arms"]:
            assert len(row[arm]["per_seed"]) == len(res["seeds"])
            assert row[arm]["ci_low"] <= row[arm]["value"] <= row[arm]["ci_high"]
    ph = next(r for r in res["rows"] if r["row"] == "phase error")
    assert np.isfinite(ph["centred"]["value"]) and res["gpu_question"] is not None
