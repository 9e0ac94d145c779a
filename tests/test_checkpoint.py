"""Checkpoints: atomic layout, keep-last-K, auto-resume skips partial/corrupt folders, exact
round trip of model + optimizer + RNG through a DeepSpeed engine (stand-in model); the lr
after resume follows from the step alone."""
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from echofm.engine import checkpoint as ckpt
from echofm.engine.config import Recipe, to_dict
from echofm.engine.distributed import build_engine, init_distributed


class StandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 1)
        self.pos_embed = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x) + self.pos_embed)).squeeze(-1)


def _recipe(tmp_path) -> Recipe:
    r = Recipe(name="standin")
    r.data.batch_size = 4
    r.train.out_dir = str(tmp_path)
    r.train.steps = 20
    r.schedule.warmup_steps = 2
    return r


def _engine(recipe, seed=0):
    torch.manual_seed(seed)
    engine, _, sched = build_engine(StandIn(), recipe, world_size=1)
    return engine, sched


def _train(engine, n, sched=None):
    """n steps on data drawn from the global torch RNG (so RNG restore matters); with `sched`
    the lr is set from the step before each, as the trainer does."""
    losses = []
    for _ in range(n):
        if sched is not None:
            sched.apply(engine.optimizer, engine.global_steps)
        x = torch.randn(4, 6)
        loss = (engine(x) - x.sum(-1)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def dist():
    return init_distributed()


def _save(engine, root, step, recipe, keep=2, extra=None):
    state = {"step": step, "rng": ckpt.rng_state(), **(extra or {})}
    return ckpt.save(engine, root, step, rank_state=state, recipe=to_dict(recipe), keep_last=keep,
                     rank=0, world_size=1)


def test_round_trip_resumes_exactly(dist, tmp_path):
    recipe = _recipe(tmp_path)
    root = tmp_path / "checkpoints"
    engine, sched = _engine(recipe)
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    _train(engine, 3, sched)
    path = _save(engine, root, 3, recipe)
    after = _train(engine, 3, sched)
    py_after, np_after = random.random(), np.random.rand()
    lrs_after = [g["lr"] for g in engine.optimizer.param_groups]
    assert lrs_after == sched.lrs(5) and len(set(sched.lrs(5))) == 1  # decay / no-decay groups alike

    engine2, sched2 = _engine(recipe, seed=99)  # different init: everything must come from disk
    state = ckpt.load(engine2, path, rank=0, world_size=1)
    ckpt.set_rng_state(state["rng"])
    assert state["step"] == 3 and engine2.global_steps == 3
    assert _train(engine2, 3, sched2) == after  # bit-exact: weights, AdamW moments, lr, RNG
    assert [g["lr"] for g in engine2.optimizer.param_groups] == lrs_after
    assert (random.random(), np.random.rand()) == (py_after, np_after)

    sd, rec = ckpt.load_model_state(tmp_path)  # run folder -> newest checkpoint
    assert rec["name"] == "standin" and rec["data"]["batch_size"] == 4
    ref = torch.load(path / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k].float()) for k in sd)


def test_keep_last_and_atomic_layout(dist, tmp_path):
    recipe = _recipe(tmp_path)
    root = tmp_path / "checkpoints"
    engine, _ = _engine(recipe)
    for step in (1, 2, 3, 4):
        _train(engine, 1)
        _save(engine, root, step, recipe, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    meta = json.loads((root / "step_00000004" / "meta.json").read_text())
    assert meta["complete"] is True and meta["step"] == 4 and meta["world_size"] == 1
    assert "rank_00000.pt" in meta["files"] and "ds/mp_rank_00_model_states.pt" in meta["files"]
    # Re-saving the same step replaces it whole.
    _save(engine, root, 4, recipe, keep=2)
    assert ckpt.find_checkpoint(root).name == "step_00000004"


def test_auto_resume_ignores_partial_and_corrupt(dist, tmp_path):
    recipe = _recipe(tmp_path)
    root = tmp_path / "checkpoints"
    engine, _ = _engine(recipe)
    _train(engine, 1)
    good = _save(engine, root, 5, recipe, keep=10)
    for step in (6, 7, 8, 9):
        _save(engine, root, step, recipe, keep=10)
    # 6: a file truncated after the fact; 7: meta.json missing (a hand-made partial copy);
    # 8: meta.json not valid JSON; 9: a file deleted. And a killed run's temp folder.
    f = root / "step_00000006" / "ds" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    (root / "step_00000007" / "meta.json").unlink()
    (root / "step_00000008" / "meta.json").write_text('{"complete": tr')
    (root / "step_00000009" / "rank_00000.pt").unlink()
    tmp = root / ".tmp-step_00000010"
    tmp.mkdir()
    (tmp / "rank_00000.pt").write_bytes(b"partial")
    (root / "step_00000011").mkdir()  # empty
    assert ckpt.find_checkpoint(root) == good
    assert ckpt.find_checkpoint(tmp_path) == good
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000005"]
    assert ckpt.find_checkpoint(tmp_path / "nothing") is None
    from echofm.engine.errors import UserError

    with pytest.raises(UserError, match="step_00000007"):
        ckpt.load(engine, root / "step_00000007", rank=0, world_size=1)
    with pytest.raises(UserError, match="saved by 1 ranks, this run has 2"):
        ckpt.load(engine, good, rank=0, world_size=2)
    # The next save clears the temp folder of the killed run.
    _save(engine, root, 12, recipe, keep=10)
    assert not tmp.exists()


def test_flipped_bytes_are_an_error_and_auto_resume_takes_the_previous(dist, tmp_path):
    """16 flipped bytes keep the file's size (the old size check passed them; an AdamW
    moment became 1.5e6): the sha256 in meta.json names the file."""
    from echofm.engine.checkpoint import CheckpointError

    recipe = _recipe(tmp_path)
    root = tmp_path / "checkpoints"
    engine, _ = _engine(recipe)
    _train(engine, 1)
    prev = _save(engine, root, 1, recipe, keep=5)
    _train(engine, 1)
    bad = _save(engine, root, 2, recipe, keep=5)
    f = bad / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[-400:-384] = bytes(b ^ 0xFF for b in data[-400:-384])
    f.write_bytes(bytes(data))
    assert ckpt.is_complete(bad)  # sizes still match
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: sha256 differs from meta.json"):
        ckpt.load(engine, bad, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        ckpt.find_checkpoint(bad, check=True)  # named directly: an error
    said = []
    assert ckpt.find_checkpoint(tmp_path, check=True, log=said.append) == prev  # searched: skipped
    assert len(said) == 1 and "skipping damaged checkpoint" in said[0] and "step_00000002" in said[0]
    assert ckpt.verify(prev)["step"] == 1
    # --resume auto with nothing intact left: an error, not a silent fresh start.
    from echofm.engine.errors import UserError
    from echofm.engine.resume import resume_point

    assert resume_point("auto", tmp_path) == prev
    (prev / "recipe.yaml").write_text((prev / "recipe.yaml").read_text().replace("a", "b"))
    with pytest.raises(UserError, match="every checkpoint is damaged"):
        resume_point("auto", tmp_path)


@pytest.mark.parametrize("victim, error, cause", [
    ("mp_rank_00_model_states.pt", OSError(28, "No space left on device"), "disk full"),
    ("rank_00000.pt", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470"),
     "as on a full disk"),
])
def test_disk_full_during_save_is_one_line(dist, tmp_path, monkeypatch, victim, error, cause):
    from echofm.engine.checkpoint import CheckpointError

    recipe = _recipe(tmp_path)
    root = tmp_path / "checkpoints"
    engine, _ = _engine(recipe)
    _train(engine, 1)
    prev = _save(engine, root, 1, recipe)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # the write of `victim` runs out of space
        if str(f).endswith(victim):
            raise error
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        _save(engine, root, 2, recipe)
    msg = str(e.value)
    assert "\n" not in msg and victim in msg and cause in msg and "step 2" in msg, msg
    assert "previous complete checkpoint is intact" in msg
    assert not (root / ".tmp-step_00000002").exists()  # the partial folder gave its space back
    assert ckpt.find_checkpoint(root, check=True) == prev


def test_resume_into_another_model_size_is_one_line(dist, tmp_path):
    from echofm.engine.checkpoint import CheckpointError

    recipe = _recipe(tmp_path)
    engine, _ = _engine(recipe)
    _train(engine, 1)
    path = _save(engine, tmp_path / "checkpoints", 1, recipe)

    class Wider(StandIn):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(6, 24), nn.LayerNorm(24), nn.Linear(24, 1)
            self.pos_embed = nn.Parameter(torch.zeros(24))

    other, _, _ = build_engine(Wider(), recipe, world_size=1)
    bigger = dict(to_dict(recipe), model=dict(to_dict(recipe)["model"], embed_dim=999))
    with pytest.raises(CheckpointError) as e:
        ckpt.load(other, path, rank=0, world_size=1, recipe=bigger)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "does not fit the recipe's model" in msg
    assert "size mismatch for" in msg and "model.embed_dim=None (recipe: 999)" in msg, msg


def test_checkpoint_files_load_weights_only(dist, tmp_path):
    """Ours and DeepSpeed's: plain data, nothing else for the unpickler to build."""
    recipe = _recipe(tmp_path)
    engine, _ = _engine(recipe)
    _train(engine, 1)
    path = _save(engine, tmp_path / "checkpoints", 1, recipe)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == 2 and all(len(v["sha256"]) == 64 for v in meta["files"].values())
    for f in path.rglob("*.pt"):
        assert ckpt.unsafe_globals(f) == [], f
    state = torch.load(path / "rank_00000.pt", weights_only=True)
    assert isinstance(state["rng"]["numpy"][1], torch.Tensor)
