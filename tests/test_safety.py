"""No code runs from a file a user passes.

A crafted checkpoint whose pickle would write a marker file (via __reduce__) is refused by
`echofm export`, by finetune (`downstream.backbone=<checkpoint>`) and by `--resume`, in
DeepSpeed's file and in ours, and the marker is never written; DeepSpeed's own loaders
(which ask for weights_only=False) are forced weights-only. Old-format checkpoints are
refused with the convert hint, and `echofm convert` makes a trusted one loadable."""
import argparse
import json

import numpy as np
import pytest
import torch

from echofm.engine import checkpoint as ckpt
from echofm.engine.checkpoint import CheckpointError
from echofm.engine.config import load_recipe, to_dict
from echofm.engine.model import EchoFM
from echofm.engine.distributed import build_engine, init_distributed

TINY = "recipes/pretrain/echofm_tiny.yaml"
SMALL = ["model.num_frames=8", "model.img_size=32", "model.patch_size=8", "model.tubelet=2",
         "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.pred_t_dim=4",
         "data.num_frames=8", "data.size=32", "data.batch_size=2", "data.num_threads=1",
         "logging.progress=false", "logging.tensorboard=false"]


class Evil:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _rehash(path):
    """What an attacker who hands over a whole folder does: meta.json matches the files."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = ckpt._hash_files(path)
    meta["files"].pop("meta.json")
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real (untrained) tiny EchoFM checkpoint: run folder with checkpoints/step_00000001."""
    init_distributed()
    out = tmp_path_factory.mktemp("good")
    recipe = load_recipe(TINY, SMALL + [f"train.out_dir={out}"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(EchoFM(recipe.model, recipe.mask, recipe.loss), recipe, world_size=1)
    state = {"step": 1, "micro": 1, "rng": ckpt.rng_state(), "nonfinite_total": 0, "elapsed": 0.0}
    ckpt.save(engine, out / "echofm_tiny" / "checkpoints", 1, rank_state=state, recipe=to_dict(recipe),
              keep_last=2, rank=0, world_size=1)
    return out / "echofm_tiny"


@pytest.fixture(params=["ds/mp_rank_00_model_states.pt", "rank_00000.pt"])
def crafted(good, tmp_path, request):
    """A copy of `good` with one file replaced by a pickle that runs code -> (run, marker)."""
    import shutil

    run = tmp_path / "crafted"
    shutil.copytree(good, run)
    marker = tmp_path / "MARKER"
    step = run / "checkpoints" / "step_00000001"
    torch.save({"module": Evil(marker), "step": 1}, step / request.param)
    _rehash(step)
    return run, marker


def test_export_refuses_crafted_checkpoint(crafted, tmp_path, capsys):
    from echofm.engine.cli import main

    run, marker = crafted
    assert ckpt.verify(run / "checkpoints" / "step_00000001")  # integrity alone cannot catch it
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "builtins.exec" in err and "echofm convert" in err, err
    assert err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "exported").exists()


def test_finetune_refuses_crafted_checkpoint(crafted, tiny_shards, tmp_path):
    from echofm.engine.downstream.run import run as finetune

    run, marker = crafted
    recipe = load_recipe("recipes/downstream/synthetic_view.yaml", [
        f"data.shards={tiny_shards}", f"downstream.backbone={run}", f"downstream.out_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="refusing to load"):
        finetune(recipe, log=lambda *_: None)
    assert not marker.exists()


def test_resume_refuses_crafted_checkpoint(crafted, tiny_shards, tmp_path):
    from echofm.engine.trainer import pretrain

    run, marker = crafted
    recipe = load_recipe(TINY, SMALL + [f"data.shards={tiny_shards}", f"train.out_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="refusing to load"):
        pretrain(recipe, resume=str(run))
    assert not marker.exists()


def test_deepspeed_loads_are_forced_weights_only(crafted, monkeypatch):
    """Even past the static scan, DeepSpeed's torch.load(weights_only=False) cannot unpickle code."""
    run, marker = crafted
    path = run / "checkpoints" / "step_00000001"
    evil = next(f for f in path.rglob("*.pt") if ckpt.unsafe_globals(f))
    with ckpt.safe_loading(), pytest.raises(Exception, match="Unsupported global"):
        torch.load(evil, weights_only=False)
    monkeypatch.setattr(ckpt, "check_pickles", lambda *a: None)
    recipe = load_recipe(TINY, SMALL)
    engine, _, _ = build_engine(EchoFM(recipe.model, recipe.mask, recipe.loss), recipe, world_size=1)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load(engine, path, rank=0, world_size=1)
    assert not marker.exists()


def test_old_format_refused_then_converted(good, tmp_path, capsys):
    """A format-1 checkpoint (sizes only, numpy RNG pickled) -> refused with the hint;
    `echofm convert` -> loads weights-only, same weights, RNG state restorable."""
    import shutil

    from echofm.engine.cli import main

    old = tmp_path / "old"
    shutil.copytree(good / "checkpoints" / "step_00000001", old)
    state = ckpt.load_plain(old / "rank_00000.pt")
    np.random.seed(5)
    state["rng"] = dict(state["rng"], numpy=np.random.get_state())  # as format 1 saved it
    want = np.random.rand()
    torch.save(state, old / "rank_00000.pt")
    meta = json.loads((old / "meta.json").read_text())
    meta.update(format=1, files={rel: (old / rel).stat().st_size for rel in meta["files"]})
    (old / "meta.json").write_text(json.dumps(meta))
    assert ckpt.is_complete(old) and ckpt.unsafe_globals(old / "rank_00000.pt")

    assert main(["export", str(old), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "older echofm" in err and f"echofm convert {old}" in err, err

    assert main(["convert", str(old), "--out", str(tmp_path / "new")]) == 0
    assert "rank_00000.pt" in capsys.readouterr().out
    new = tmp_path / "new"
    assert ckpt.verify(new)["format"] == ckpt.FORMAT
    converted = ckpt.load_plain(new / "rank_00000.pt")
    ckpt.set_rng_state(converted["rng"])
    assert np.random.rand() == want
    a, _ = ckpt.load_model_state(new)
    b, _ = ckpt.load_model_state(good)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_single_pickled_file(tmp_path):
    """An official-style .pth with a pickled argparse.Namespace: refused weights-only, convertible."""
    src = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, model="vit"),
                "epoch": np.int64(3)}, src)
    with pytest.raises(Exception, match="argparse"):
        torch.load(src, weights_only=True)
    out, rewritten = ckpt.convert(src, tmp_path / "plain.pth")
    got = torch.load(out, weights_only=True)
    assert rewritten == [str(src)] and got["args"] == {"lr": 0.1, "model": "vit"} and got["epoch"] == 3
    assert torch.equal(got["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("rel", ["../../outside.pt", "/tmp/abs.pt"])
def test_convert_refuses_a_meta_json_pointing_outside_the_folder(good, tmp_path, capsys, rel):
    """Regression (issue 29): `echofm convert` followed `../` in meta.json `files` and wrote
    outside --out."""
    import shutil

    from echofm.engine.cli import main

    old = tmp_path / "ck" / "step_00000001"
    shutil.copytree(good / "checkpoints" / "step_00000001", old)
    meta = json.loads((old / "meta.json").read_text())
    meta["files"][rel] = meta["files"].pop("rank_00000.pt")
    (old / "meta.json").write_text(json.dumps(meta))
    assert main(["convert", str(old.parent), "--out", str(tmp_path / "out" / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"echofm: error: {old / 'meta.json'}: file entry {rel!r} points outside the checkpoint folder: refused"
    assert not (tmp_path / "out").exists() and not (tmp_path / "outside.pt").exists()
