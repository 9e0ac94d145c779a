"""`echofm finetune` / `echofm evaluate` end to end on the tiny shards with a small random-init
backbone: results JSON with CIs, PNGs, predictions, and evaluate reproducing every number."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from echofm.engine.config import load_recipe
from echofm.engine.downstream.backbone import load_backbone
from echofm.engine.downstream.run import evaluate, run

# A 2-block, 64-wide backbone: the run mechanics, not representation quality, are under test.
SMALL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_num_heads=2", "model.decoder_depth=1"]


def recipe(task, shards, out, *extra):
    return load_recipe(f"recipes/downstream/synthetic_{task}.yaml",
                       [f"data.shards={shards}", "downstream.backbone=random", f"downstream.out_dir={out}",
                        "downstream.bootstrap=50", "downstream.train_clips=1", "downstream.test_clips=2",
                        *SMALL, *extra])


def test_probe_view_results_png_and_evaluate(tiny_shards, tmp_path):
    r = recipe("view", tiny_shards, tmp_path, "downstream.epochs=60")
    res = run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert saved["backbone"]["kind"] == "random" and saved["config"]["downstream"]["task"] == "view"
    test = saved["metrics"]["test"]
    for k in ("accuracy", "macro_f1"):
        v = test[k]
        assert 0.0 <= v["ci_low"] <= v["value"] <= v["ci_high"] <= 1.0
    assert (run_dir / "test_confusion.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(run_dir / "test_predictions.csv")))
    assert len(rows) == test["videos"]
    acc = np.mean([row["label"] == row["pred"] for row in rows])
    assert acc == pytest.approx(test["accuracy"]["value"])
    # evaluate: backbone re-created from the recorded seed, head reloaded, features recomputed.
    ev = evaluate(r, run_dir, log=lambda *_: None)
    assert ev["metrics"] == saved["metrics"]


def test_probe_ef_metrics_match_predictions(tiny_shards, tmp_path):
    r = recipe("ef", tiny_shards, tmp_path, "downstream.epochs=60", "downstream.select_wd=false")
    res = run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    for split, m in res["metrics"].items():
        rows = list(csv.DictReader(open(run_dir / f"{split}_predictions.csv")))
        y = np.array([float(x["label"]) for x in rows])
        p = np.array([float(x["pred"]) for x in rows])
        assert m["mae"]["value"] == pytest.approx(np.abs(p - y).mean(), abs=1e-5)
        assert m["rmse"]["value"] == pytest.approx(np.sqrt(((p - y) ** 2).mean()), abs=1e-5)
        assert m["bias"] == pytest.approx((p - y).mean(), abs=1e-5)
    assert (run_dir / "test_ef.png").is_file()


def test_evaluate_refuses_another_backbone(tiny_shards, tmp_path):
    r = recipe("view", tiny_shards, tmp_path, "downstream.epochs=5", "downstream.select_wd=false")
    run(r, log=lambda *_: None)
    echofm = str(Path(sys.executable).parent / "echofm")  # the installed command
    res = subprocess.run([echofm, "evaluate", "recipes/downstream/synthetic_view.yaml",
                          "--checkpoint", str(tmp_path / r.name), "--set", f"data.shards={tiny_shards}",
                          *[a for s in SMALL + ["model.depth=1"] for a in ("--set", s)]],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not the one the head was trained on" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_finetune_mode_layer_decay_and_evaluate(tiny_shards, tmp_path):
    r = recipe("grade", tiny_shards, tmp_path, "downstream.mode=finetune", "downstream.epochs=1",
               "data.batch_size=4", "downstream.layer_decay=0.5", "downstream.backbone_lr=1.0e-4")
    res = run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    assert (run_dir / "backbone" / "model.safetensors").is_file()
    fit = res["fit"]
    assert fit["steps"] >= 1 and fit["lr_by_layer"]["0"] == pytest.approx(1e-4 * 0.5 ** 3)
    # The backbone itself was trained (its weights moved away from the seeded init).
    assert res["backbone"]["fingerprint"] != load_backbone("random", r, seed=r.downstream.seed)[1]["fingerprint"]
    ev = evaluate(r, run_dir, log=lambda *_: None)
    assert ev["metrics"] == res["metrics"]
