"""`echofm finetune` / `echofm evaluate` end to end on the tiny shards with a small random-init
backbone: results JSON with CIs, PNGs, predictions, and evaluate reproducing every number."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_finetune_runs_on_the_trainer_skips_nonfinite_and_resumes(tiny_shards, tmp_path):
    """The fine-tune is a Trainer run in <run>/finetune/: a NaN micro-batch is skipped and
    counted, checkpoints land there, and --resume auto continues (here: one more epoch)."""
    from echofm.engine import checkpoint as ckpt

    base = ["downstream.mode=finetune", "data.batch_size=2", "train.checkpoint_every=0", "logging.every=1"]
    r = recipe("ef", tiny_shards, tmp_path, *base, "downstream.epochs=1", "train.nan_inject=[2]")
    res = run(r, log=lambda *_: None)
    train_dir = tmp_path / r.name / "finetune"
    summary = json.loads((train_dir / "summary.json").read_text())
    steps = res["fit"]["steps"]
    assert summary["nonfinite_total"] == 1 and summary["steps"] == steps >= 2
    assert ckpt.find_checkpoint(train_dir).name == f"step_{steps:08d}"
    with pytest.raises(Exception, match="already has checkpoints.*downstream.out_dir"):
        run(r, log=lambda *_: None)
    longer = recipe("ef", tiny_shards, tmp_path, *base, "downstream.epochs=2")
    res2 = run(longer, log=lambda *_: None, resume="auto")
    assert res2["fit"]["steps"] == 2 * steps and res2["fit"]["resumed_from"].endswith(f"step_{steps:08d}")
    lines = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == list(range(1, 2 * steps + 1))


def test_finetune_two_ranks_each_read_their_part(tiny_shards, tmp_path):
    """torchrun, 2 processes: each rank streams its own half of the labelled clips (its
    stream state in the checkpoint says rank r of 2), rank 0 alone writes the results."""
    import os

    from echofm.engine import checkpoint as ckpt

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    sets = [f"data.shards={tiny_shards}", "downstream.backbone=random", f"downstream.out_dir={tmp_path}",
            "downstream.bootstrap=0", "downstream.test_clips=1", "downstream.mode=finetune",
            "downstream.epochs=1", "data.batch_size=1", *SMALL]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "echofm.engine.cli", "finetune", "recipes/downstream/synthetic_view.yaml",
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.loads((tmp_path / "synthetic_view" / "results.json").read_text())
    assert results["fit"]["ranks"] == 2
    last = ckpt.find_checkpoint(tmp_path / "synthetic_view" / "finetune")
    states = [torch.load(last / f"rank_{k:05d}.pt", weights_only=True)["stream"] for k in (0, 1)]
    assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
    assert states[0]["items"] == states[1]["items"]  # the same labelled set, split between them
    clips = [s["stats"]["clips"] for s in states]
    assert clips[0] == clips[1] == results["fit"]["steps"]  # batch 1: one clip per step and rank
    assert results["fit"]["train_clips_seen"] == sum(clips)
