"""Checkpoints: atomic layout, keep-last-K, auto-resume skips partial/corrupt folders, exact
round trip of model + optimizer + schedule + RNG through a DeepSpeed engine (stand-in model)."""
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from echofm.engine import checkpoint as ckpt
from echofm.engine.config import Recipe, to_dict
from echofm.engine.trainer import build_engine, init_distributed


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


def _train(engine, n):
    """n steps on data drawn from the global torch RNG (so RNG restore matters)."""
    losses = []
    for _ in range(n):
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
    _train(engine, 3)
    path = _save(engine, root, 3, recipe)
    after = _train(engine, 3)
    py_after, np_after = random.random(), np.random.rand()
    lr_after = sched.get_last_lr()

    engine2, sched2 = _engine(recipe, seed=99)  # different init: everything must come from disk
    state = ckpt.load(engine2, path, rank=0, world_size=1)
    ckpt.set_rng_state(state["rng"])
    assert state["step"] == 3 and engine2.global_steps == 3
    assert _train(engine2, 3) == after  # bit-exact: weights, AdamW moments, lr, RNG
    assert sched2.get_last_lr() == lr_after
    assert (random.random(), np.random.rand()) == (py_after, np_after)

    sd, rec = ckpt.load_model_state(tmp_path)  # run folder -> newest checkpoint
    assert rec["name"] == "standin" and rec["data"]["batch_size"] == 4
    ref = torch.load(path / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
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
