"""Provenance: the git state of a checkout (commit, uncommitted changes), the recipe hash,
`echofm --version`, and what every summary carries; exported weights readable by others."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from echofm.engine import provenance as prov
from echofm.engine.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def test_git_state_commit_and_uncommitted_changes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert prov.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "new.txt").write_text("untracked files are not changes to the code")
    assert prov.git_state(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert prov.git_state(repo) == {"commit": head, "dirty": True}
    # an installed copy inside someone else's repository is not a checkout of echofm
    (repo / "site" / "echofm").mkdir(parents=True)
    assert prov.git_state(repo / "site") == {"commit": None, "dirty": None}


def test_recipe_hash_follows_the_settings():
    a = load_recipe("recipes/pretrain/echofm_tiny.yaml")
    b = load_recipe("recipes/pretrain/echofm_tiny.yaml", ["train.steps=7"])
    assert prov.recipe_hash(a) == prov.recipe_hash(load_recipe("recipes/pretrain/echofm_tiny.yaml"))
    assert prov.recipe_hash(a) != prov.recipe_hash(b) and len(prov.recipe_hash(a)) == 16


def test_provenance_block():
    p = prov.provenance(load_recipe("recipes/pretrain/echofm_tiny.yaml"))
    assert set(p) == {"echofm", "git", "recipe_sha256", "python", "packages"}
    assert set(p["packages"]) == {"torch", "triton", "deepspeed", "numpy", "av", "dali"}
    import numpy
    import torch

    assert p["packages"]["torch"] == torch.__version__ and p["packages"]["numpy"] == numpy.__version__
    assert p["git"]["commit"] == subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                                text=True).stdout.strip()


def test_version_command():
    echofm = str(Path(sys.executable).parent / "echofm")  # the installed command
    r = subprocess.run([echofm, "--version"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    commit = prov.git_state()["commit"]
    assert r.stdout.startswith(f"echofm {prov.version()} (git {commit[:12]}")


def test_export_is_readable_by_others(tmp_path):
    """Regression: safetensors wrote the exported weights with mode 0600."""
    import torch

    from echofm.engine import checkpoint as ckpt
    from echofm.engine.config import to_dict
    from echofm.engine.export import export
    from echofm.engine.model import EchoFM
    from echofm.engine.distributed import build_engine, init_distributed

    init_distributed()
    small = ["model.depth=1", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
             "model.decoder_num_heads=2", "model.decoder_depth=1"]
    r = load_recipe("recipes/pretrain/echofm_tiny.yaml", ["data.shards=unused", *small])
    torch.manual_seed(0)
    engine, _, _ = build_engine(EchoFM(r.model, r.mask, r.loss), r, world_size=1)
    path = ckpt.save(engine, tmp_path / "checkpoints", 1, rank_state={"step": 1, "rng": ckpt.rng_state()},
                     recipe=to_dict(r), keep_last=1, rank=0, world_size=1)
    out = export(path, tmp_path / "export")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert json.loads((out / "config.json").read_text())["model"]["embed_dim"] == 64


@pytest.mark.parametrize("preset,dim", [("echofm_tiny", 192), ("echofm_vit_base", 768)])
def test_config_show_resolves_the_preset(capsys, preset, dim):
    from echofm.engine.cli import main

    assert main(["config", "show", "recipes/pretrain/echofm_tiny.yaml", "--set", f"model.preset={preset}"]) == 0
    shown = capsys.readouterr().out
    assert f"  embed_dim: {dim}\n" in shown and "null" not in shown.split("model:")[1].split("mask:")[0]
