"""`echofm export`: a training checkpoint -> model.safetensors + config.json, the form that
`EchoFM.from_pretrained` (and downstream runs) load without DeepSpeed."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import load_model_state
from .config import recipe_from_data
from .model import EchoFM


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint (a checkpoint, checkpoints/ or run folder: its newest complete checkpoint,
    hashed and read weights-only) -> `out_dir` with model.safetensors + config.json."""
    state, recipe_dict = load_model_state(path)
    recipe = recipe_from_data(recipe_dict, file=f"{path} (stored recipe)")
    recipe.validate()
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    model.load_state_dict(state)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
