"""`echofm export`: a training checkpoint -> model.safetensors + config.json, the form that
`EchoFM.from_pretrained` (and downstream runs) load without DeepSpeed, and a model card
README.md (engine/model_card.py)."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import load_model_state
from .config import recipe_from_data
from .model import EchoFM
from .model_card import write_card


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint (a checkpoint, checkpoints/ or run folder: its newest complete checkpoint,
    hashed and read weights-only) -> `out_dir` with model.safetensors, config.json and
    the model card README.md."""
    state, recipe_dict = load_model_state(path)
    recipe = recipe_from_data(recipe_dict, file=f"{path} (stored recipe)")
    recipe.validate()
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    model.load_state_dict(state)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    card = write_card(out_dir, recipe, model, path)
    publish(out_dir / "model.safetensors", out_dir / "config.json", card)
    return out_dir


def publish(*paths: str | Path) -> None:
    """Give files the mode a plain write would (0644 under the usual umask 022): safetensors
    writes 0600, which keeps weights meant for sharing from the rest of a team."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)
