"""Elastic resume (loaders/sampling.py, loaders/stream.py, engine/trainer.py): a run saved at
one world size / per-rank batch size resumes at another in the middle of an epoch, and the
epoch still delivers every sample exactly once; changes that cannot are one-line errors."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from echofm.engine import checkpoint as ckpt
from echofm.engine.config import load_recipe
from echofm.engine.errors import UserError
from echofm.engine.trainer import Trainer
from echofm.loaders.stream import ClipStream, StreamConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TINY, _cli, _env, _overrides  # noqa: E402


def _cfg(shards, **kw) -> StreamConfig:
    return StreamConfig(**(dict(shards=str(shards), split="all", num_frames=8, stride=2, size=64, batch_size=2,
                                num_threads=1, random_resized_crop=(0.6, 1.0), flip=True) | kw))


def _take(stream, n: int) -> list[dict]:
    it, out = iter(stream), []
    for _ in range(n):
        out.append(next(it))
    return out


def _keys(batches) -> list[str]:
    return [m["key"] for b in batches for m in b["meta"]]


@pytest.mark.parametrize("saved, resumed", [((2, 2), (1, 4)), ((1, 4), (2, 2)), ((2, 2), (1, 3))])
def test_stream_resumes_on_another_world_size_each_sample_once(tiny_shards, saved, resumed):
    """Half an epoch on `saved` (ranks, batch), the streams dropped (a killed job), the rest on
    `resumed`: the epoch's keys are the split's, none twice; with the same global batch the
    resumed batches are the pixels an uninterrupted run would have made."""
    (w0, b0), (w1, b1) = saved, resumed
    epoch = 3
    first = [ClipStream(_cfg(tiny_shards, batch_size=b0), rank=r, world_size=w0) for r in range(w0)]
    for s in first:
        s.set_epoch(epoch)
    n = len(first[0]._items)
    half = len(first[0]) // 2
    head = [_take(s, half) for s in first]
    states = [pickle.loads(pickle.dumps(s.state_dict())) for s in first]
    assert len({(st["epoch"], st["cursor"]) for st in states}) == 1  # the state is global
    del first, s
    rest = []
    for r in range(w1):
        s = ClipStream(_cfg(tiny_shards, batch_size=b1), rank=r, world_size=w1)
        s.load_state_dict(states[r % w0])
        s.set_epoch(epoch)  # the trainer's per-epoch call keeps the position
        changes = [f"world size {w0} -> {w1}"] + ([f"data.batch_size {b0} -> {b1}"] if b0 != b1 else [])
        assert s.resume_notes == changes
        rest.append([b for b in s if True])
        assert s.epoch == epoch + 1
    keys = _keys(b for h in head for b in h) + _keys(b for r in rest for b in r)
    assert len(keys) == len(set(keys))  # none twice
    dropped = (n - states[0]["cursor"]) % (w1 * b1)  # the last incomplete global batch (drop_last)
    assert len(keys) == n - dropped
    split = set(ClipStream(_cfg(tiny_shards, batch_size=1)).samples.keys)
    assert set(keys) <= split and (dropped or set(keys) == split)
    if w0 * b0 == w1 * b1:  # the same global batches, clip for clip and pixel for pixel
        ref = [ClipStream(_cfg(tiny_shards, batch_size=b0), rank=r, world_size=w0) for r in range(w0)]
        for s in ref:
            s.set_epoch(epoch)
        ref_batches = [list(s) for s in ref]

        def glob(per_rank, k):  # global batch k: the ranks' parts in rank order
            return (torch.cat([p[k]["video"] for p in per_rank]), torch.cat([p[k]["frames_index"] for p in per_rank]),
                    [m["key"] for p in per_rank for m in p[k]["meta"]])

        for k in range(len(rest[0])):
            v, f, ks = glob(rest, k)
            rv, rf, rks = glob(ref_batches, half + k)
            assert ks == rks and torch.equal(f, rf) and torch.equal(v, rv)


def _stub(recipe, world):
    return SimpleNamespace(recipe=recipe, dist=SimpleNamespace(world=world))


def _meta(world, stage=0, accum=1, batch=2):
    return {"world_size": world, "recipe": {"deepspeed": {"zero_stage": stage, "grad_accum": accum},
                                             "data": {"batch_size": batch}}}


def test_resume_settings_refused_or_noted_in_one_line(tiny_shards, tmp_path):
    recipe = load_recipe(TINY, _overrides(tiny_shards, tmp_path))
    check = Trainer._resume_changes
    assert check(_stub(recipe, 1), tmp_path, _meta(1)) == []
    with pytest.raises(UserError, match=r"saved with deepspeed.zero_stage=2, this run has 0;.*"
                                        r"--set deepspeed.zero_stage=2$"):
        check(_stub(recipe, 1), tmp_path, _meta(1, stage=2))
    recipe2 = load_recipe(TINY, _overrides(tiny_shards, tmp_path, "deepspeed.zero_stage=2"))
    with pytest.raises(UserError, match="saved by 2 ranks with deepspeed.zero_stage=2.*resume on 2 ranks"):
        check(_stub(recipe2, 1), tmp_path, _meta(2, stage=2))
    # world size, batch and grad-accum changes at ZeRO 0 carry over, each named in the note
    recipe4 = load_recipe(TINY, _overrides(tiny_shards, tmp_path, "deepspeed.grad_accum=2"))
    assert check(_stub(recipe4, 1), tmp_path, _meta(2, accum=1)) == ["deepspeed.grad_accum 1 -> 2"]
    assert check(_stub(recipe, 1), tmp_path, _meta(2, accum=1)) == [
        "global batch 4 -> 2 clips per step (the peak lr scales with it)"]


@pytest.fixture(scope="module")
def two_rank_run(tiny_shards, tmp_path_factory):
    """2 processes (torchrun), ZeRO 0, 2 steps of global batch 4, checkpointed -> out folder."""
    out = tmp_path_factory.mktemp("elastic")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_cli("pretrain", TINY, *sum((["--set", o] for o in _overrides(
               tiny_shards, out, "train.steps=2", "train.checkpoint_every=2", "name=el", "data.split=all")), []))[1:]]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out


def test_trainer_resumes_two_ranks_on_one(two_rank_run, tiny_shards):
    """Saved by 2 ranks x batch 2, resumed by 1 rank x batch 4 (the same global batch): the
    run goes on with one note line and its loader cursor counts every clip once."""
    args = sum((["--set", o] for o in _overrides(tiny_shards, two_rank_run, "train.steps=4", "name=el",
                                                 "data.split=all", "data.batch_size=4")), [])
    r = subprocess.run(_cli("pretrain", TINY, *args, "--resume", "auto"), env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = r.stdout + r.stderr
    assert "note: resumed with world size 2 -> 1, data.batch_size 2 -> 4;" in out, out[-2000:]
    run = two_rank_run / "el"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    last = ckpt.find_checkpoint(run)
    state = ckpt.load_plain(last / "rank_00000.pt")["stream"]
    n = len(ClipStream(_cfg(tiny_shards, batch_size=1))._items)
    per_epoch = n // 4 * 4  # whole global batches of 4
    epoch, cursor = divmod(4 * 4, per_epoch)
    assert (state["epoch"], state["cursor"], state["world_size"], state["batch_size"]) == (epoch, cursor, 1, 4)
    # a ZeRO stage change is refused in one line naming the setting
    args2 = sum((["--set", o] for o in _overrides(tiny_shards, two_rank_run, "train.steps=6", "name=el",
                                                  "data.split=all", "deepspeed.zero_stage=1")), [])
    r = subprocess.run(_cli("pretrain", TINY, *args2, "--resume", "auto"), env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err[-1].startswith("echofm: error: ") and "deepspeed.zero_stage=0, this run has 1" \
        in err[-1], r.stderr[-2000:]
