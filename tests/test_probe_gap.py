"""`echofm bench probe_gap`: the probe-gap sweep runs the demo's probe on every layer and
pooling of a backbone, a pixel floor and the chance floor, and its chance numbers are
the hand-computed ones."""
import json

import numpy as np
import pytest


def test_probe_gap_sweep(tiny_shards, tmp_path):
    from echofm.engine.cli import main
    from echofm.loaders.shards import iter_tar_samples, read_manifest, read_sample_records

    out = tmp_path / "gap.json"
    assert main(["bench", "probe_gap", "--shards", str(tiny_shards), "--layers", "0,3",
                 "--bootstrap", "20", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    # random init x 2 layers x 3 poolings, then the pixel floor
    assert [(r["backbone"], r["layer"], r["pooling"]) for r in rows] == [
        ("random", 0, "mean"), ("random", 0, "mean+dyn"), ("random", 0, "grid+dyn"),
        ("random", 3, "mean"), ("random", 3, "mean+dyn"), ("random", 3, "grid+dyn"),
        ("pixels", None, "mean7+std14")]
    assert [r["last"] for r in rows[:6]] == [False] * 3 + [True] * 3
    for r in rows:
        assert 0.0 <= r["view"]["value"] <= 1.0 and r["ef"]["value"] >= 0.0
        assert r["view"]["ci_low"] <= r["view"]["value"] <= r["view"]["ci_high"]

    # Chance floors from the sample json of the shards themselves.
    manifest = read_manifest(tiny_shards)
    samples = read_sample_records(tiny_shards, manifest)
    meta = {key: json.loads(comp["json"]) for sh in manifest["shards"]
            for key, comp in iter_tar_samples(tiny_shards / sh["tar"])}
    train = [meta[s["key"]] for s in samples if s["split"] == "train"]
    test = [meta[s["key"]] for s in samples if s["split"] == "test"]
    mu = np.mean([m["labels"]["ef"] for m in train])
    assert res["chance"]["ef"] == pytest.approx(np.mean([abs(m["labels"]["ef"] - mu) for m in test]))
    views = [m["view"] for m in train]
    top = max(sorted(set(views)), key=views.count)
    assert res["chance"]["view"] == pytest.approx(np.mean([m["view"] == top for m in test]))
    assert res["test_videos"] == len(test) and res["train_videos"] == len(train)
