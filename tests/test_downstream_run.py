"""`echofm finetune` / `echofm evaluate` end to end on the tiny shards with a small random-init
backbone: results JSON with CIs, PNGs, predictions, and evaluate reproducing every number from
the run folder alone; the edges: empty splits, few patients, a recipe that does not describe
the backbone, a backbone override, an external test-only cohort."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echofm.engine.cli import main
from echofm.engine.config import load_recipe
from echofm.engine.downstream.backbone import load_backbone
from echofm.engine.downstream.run import evaluate, load_run_recipe, run

# A 2-block, 64-wide backbone: the run mechanics, not representation quality, are under test.
SMALL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_num_heads=2", "model.decoder_depth=1"]


def sets(shards, out, *extra):
    return [f"data.shards={shards}", "downstream.backbone=random", f"downstream.out_dir={out}",
            "downstream.bootstrap=50", "downstream.train_clips=1", "downstream.test_clips=2", *SMALL, *extra]


def recipe(task, shards, out, *extra):
    return load_recipe(f"recipes/downstream/synthetic_{task}.yaml", sets(shards, out, *extra))


def split_subset(shards: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A shard set holding only the shards of `keep` splits (links to the same files)."""
    m = json.loads((shards / "manifest.json").read_text())
    dst.mkdir()
    m["shards"] = [s for s in m["shards"] if s["split"] in keep]
    for s in m["shards"]:
        for f in (s["tar"], s["idx"], s["samples_file"]):
            (dst / f).symlink_to(shards / f)
    m["splits"] = {k: v for k, v in m["splits"].items() if k in keep}
    m["total_samples"] = sum(s["samples"] for s in m["shards"])
    m["total_frames"] = sum(s["frames"] for s in m["shards"])
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def _set(*items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def test_probe_view_results_png_and_evaluate(tiny_shards, tmp_path, capsys):
    """The bar: `echofm finetune R --set ...` then `echofm evaluate RUN_DIR` with no --set
    gives exactly the run's metrics (the run folder holds its recipe)."""
    assert _cli("finetune", "recipes/downstream/synthetic_view.yaml",
                *_set(*sets(tiny_shards, tmp_path, "downstream.epochs=60"))) == 0
    run_dir = tmp_path / "synthetic_view"
    out = capsys.readouterr().out
    assert f"synthetic_view: run folder {run_dir}" in out and f"wrote {run_dir / 'results.json'}" in out
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["backbone"]["kind"] == "random" and saved["config"]["downstream"]["task"] == "view"
    prov = saved["provenance"]
    assert len(prov["git"]["commit"]) == 40 and prov["echofm"] and prov["packages"]["torch"] == torch.__version__
    # 1 test patient: the CI warning is printed and recorded
    assert any("split 'test': the confidence intervals rest on 1 patient(s)" in w for w in saved["warnings"])
    assert "warning: split 'test': the confidence intervals rest on 1 patient(s)" in out
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
    assert _cli("evaluate", run_dir) == 0
    ev = json.loads((run_dir / "evaluate.json").read_text())
    assert ev["metrics"] == saved["metrics"] and ev["provenance"]["recipe_sha256"] == prov["recipe_sha256"]
    assert (run_dir / "evaluate_test_predictions.csv").read_text() == (run_dir / "test_predictions.csv").read_text()


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
    res = subprocess.run([echofm, "evaluate", str(tmp_path / r.name), "--set", "model.depth=1"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not the one the head was trained on" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one line, no traceback
    # the older form (RECIPE --checkpoint RUN_DIR) still works
    res = subprocess.run([echofm, "evaluate", "recipes/downstream/synthetic_view.yaml", "--checkpoint",
                          str(tmp_path / r.name), *_set(*sets(tiny_shards, tmp_path))], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _export(path: Path) -> Path:
    """A small random backbone saved as an `echofm export` folder."""
    from echofm.engine.model import EchoFM

    r = load_recipe("recipes/pretrain/echofm_tiny.yaml", SMALL)
    torch.manual_seed(1)
    return EchoFM(r.model, r.mask, r.loss).save_pretrained(path)


def test_recipe_model_must_describe_the_backbone_and_backbone_override(tiny_shards, tmp_path):
    """Regression: a recipe whose model: said one architecture ran another one's export
    silently. Then evaluate: an override holding the same weights is honoured, others refused."""
    exp = _export(tmp_path / "exp")
    plain = [s for s in sets(tiny_shards, tmp_path, "downstream.epochs=5", "downstream.select_wd=false")
             if s not in SMALL]
    r = load_recipe("recipes/downstream/synthetic_ef.yaml", plain + [f"downstream.backbone={exp}"])
    with pytest.raises(Exception, match=r"the recipe's model: \(preset echofm_tiny\) disagrees with the backbone "
                                        r".*model.embed_dim=192 but the backbone has 64, model.depth=4 but the "
                                        r"backbone has 2.*--set model.embed_dim=64 --set model.depth=2"):
        run(r, log=lambda *_: None)
    assert not (tmp_path / r.name / "results.json").exists()
    r = recipe("ef", tiny_shards, tmp_path, "downstream.epochs=5", "downstream.select_wd=false",
               f"downstream.backbone={exp}")
    res = run(r, log=lambda *_: None)
    moved = Path(shutil.copytree(exp, tmp_path / "moved"))
    run_dir = tmp_path / r.name
    ev = evaluate(load_run_recipe(run_dir, [f"downstream.backbone={moved}"]), run_dir, log=lambda *_: None)
    assert ev["metrics"] == res["metrics"] and ev["backbone"]["spec"] == str(moved)
    with pytest.raises(Exception, match=rf"loaded from 'random' .* is not the one the head was trained on "
                                        rf"\('{exp}', weights {res['backbone']['fingerprint']}\); drop the override"):
        evaluate(load_run_recipe(run_dir, ["downstream.backbone=random"]), run_dir, log=lambda *_: None)


def test_missing_test_split_is_refused_naming_it(tiny_shards, tmp_path, capsys):
    """Regression: finetune on shards without a test split exited 0 with metrics {}."""
    no_test = split_subset(tiny_shards, tmp_path / "no_test", ("train", "val"))
    args = ("finetune", "recipes/downstream/synthetic_view.yaml", *_set(*sets(no_test, tmp_path / "runs")))
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    have = json.loads((no_test / "manifest.json").read_text())["splits"]
    assert len(err) == 1 and err[0].startswith(f"echofm: error: {no_test}: split 'test' (downstream.test_split) "
                                               f"is empty (the shards have train {have['train']}, val {have['val']})")
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    no_val = split_subset(tiny_shards, tmp_path / "no_val", ("train", "test"))
    res = run(recipe("view", no_val, tmp_path, "downstream.epochs=5"), log=print)
    assert list(res["metrics"]) == ["test"]
    assert ("warning: " + f"{no_val}: split 'val' (downstream.val_split) is empty: no val metrics; the probe's "
            "weight decay is not selected") in capsys.readouterr().out


def test_evaluate_scores_an_external_test_only_cohort(tiny_shards, tmp_path):
    r = recipe("view", tiny_shards, tmp_path, "downstream.epochs=5", "downstream.select_wd=false")
    res = run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    cohort = split_subset(tiny_shards, tmp_path / "site_b", ("test",))
    assert _cli("evaluate", run_dir, "--data", cohort) == 0
    ext = json.loads((run_dir / "evaluate_site_b.json").read_text())
    assert ext["data"] == str(cohort) and list(ext["metrics"]) == ["test"]
    assert ext["metrics"]["test"] == res["metrics"]["test"]  # the same test clips: the same numbers
    assert (run_dir / "evaluate_site_b_test_confusion.png").is_file()
    train_only = split_subset(tiny_shards, tmp_path / "site_c", ("train",))
    with pytest.raises(Exception, match=r"none of the splits the run scored \(val, test\) has samples"):
        evaluate(load_run_recipe(run_dir), run_dir, data=train_only)


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
    ev = evaluate(load_run_recipe(run_dir), run_dir, log=lambda *_: None)
    assert ev["metrics"] == res["metrics"]
    assert oct((run_dir / "backbone" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    summary = json.loads((run_dir / "finetune" / "summary.json").read_text())
    assert summary["provenance"]["recipe_sha256"] and (run_dir / "finetune" / "train.log").is_file()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def test_evaluate_warns_when_the_shards_changed_since_the_run(tiny_shards, tmp_path, capsys):
    """Regression (issue 29): evaluate after the shards changed gave other numbers silently;
    results.json records the manifest's sha256 and evaluate names the mismatch."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    r = recipe("view", shards, tmp_path, "downstream.epochs=5", "downstream.select_wd=false")
    run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    saved = json.loads((run_dir / "results.json").read_text())
    assert len(saved["shards_manifest_sha256"]) == 64
    assert evaluate(load_run_recipe(run_dir), run_dir, log=lambda *_: None)["warnings"] == saved["warnings"]
    m = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps(m, indent=3))  # any change to the shards changes it
    capsys.readouterr()
    assert _cli("evaluate", run_dir) == 0
    out = capsys.readouterr().out
    assert f"WARNING: {shards}/manifest.json: sha256" in out and "the shards changed since the run" in out
    ev = json.loads((run_dir / "evaluate.json").read_text())
    assert "the shards changed since the run" in ev["warnings"][0]
