"""benchmarks/supervised_ref.py: the supervised reference runs end to end on the test
shards, its chance row is the hand-computed one, and its augmentation changes neither a
clip's content nor its labels (a shift, a gain, a reversal)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "supervised_ref.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("supervised_ref", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_augment_shifts_scales_and_reverses(ref):
    # frame t of every clip is flat at 10 (t + 1), with one bright pixel at (16, 16)
    x = (torch.arange(1, 9, dtype=torch.uint8) * 10)[None, :, None, None].repeat(16, 1, 32, 32)
    x[:, :, 16, 16] = 200
    out = ref.augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.float32
    flat = out.flatten(2).argmax(2)
    assert (flat == flat[0, 0]).all()  # one shift for the whole batch
    dy, dx = int(flat[0, 0]) // 32 - 16, int(flat[0, 0]) % 32 - 16
    assert 0 < max(abs(dy), abs(dx)) <= 8
    if dy:  # zero fill where the shift uncovers the frame, no wrap-around
        assert (out[:, :, :dy] == 0).all() if dy > 0 else (out[:, :, dy:] == 0).all()
    level = out[:, :, 16 + dy, 16 + dx + 2]  # a flat pixel, [B, T]
    ramp = torch.arange(1, 9, dtype=torch.float32) * 10
    reversed_ = []
    for b in range(16):
        gain = float(level[b].max()) / 80.0
        assert 0.8 <= gain <= 1.25
        forward = torch.allclose(level[b], gain * ramp, atol=1e-3)
        assert forward or torch.allclose(level[b], gain * ramp.flip(0), atol=1e-3), b
        reversed_.append(not forward)
    assert 0 < sum(reversed_) < 16


def test_supervised_ref_on_test_shards(ref, tiny_shards, tmp_path, monkeypatch):
    out = tmp_path / "ref.json"
    monkeypatch.setattr(sys, "argv", ["supervised_ref.py", "--shards", str(tiny_shards), "--epochs", "1",
                                      "--train-clips", "2", "--test-clips", "2", "--bootstrap", "20",
                                      "--no-probe", "--out", str(out)])
    assert ref.main() == 0
    res = json.loads(out.read_text())
    assert list(res["rows"]) == ["cnn", "chance"]
    for row in res["rows"].values():
        assert set(row) == set(ref.METRICS)
        assert row["view_accuracy"]["ci_low"] <= row["view_accuracy"]["value"] <= row["view_accuracy"]["ci_high"]
    # chance from the sample json: training-mean EF, majority training view, per test video
    from echofm.engine.downstream.data import list_samples

    train, test = list_samples(tiny_shards, "train"), list_samples(tiny_shards, "test")
    mu = np.mean([m["labels"]["ef"] for m in train])
    chance = res["rows"]["chance"]
    assert chance["ef_mae"]["value"] == pytest.approx(np.mean([abs(m["labels"]["ef"] - mu) for m in test]))
    views = [m["view"] for m in train]
    top = max(sorted(set(views)), key=views.count)
    assert chance["view_accuracy"]["value"] == pytest.approx(np.mean([m["view"] == top for m in test]))
    assert (res["train_videos"], res["test_videos"]) == (len(train), len(test))
