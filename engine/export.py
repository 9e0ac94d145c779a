"""`echofm export`: a training checkpoint -> model.safetensors + config.json + a model card
README.md (engine/model_card.py) + checksums.sha256, the form that `EchoFM.from_pretrained`
and downstream runs load without DeepSpeed.

`load_export` (downstream backbones, `embed`) and `EchoFM.from_pretrained` are the checked
way in: every file against checksums.sha256 (`sha256sum -c` reads it too), config.json's model
bounded in size before anything is built, and the safetensors header checked against the
tensors that model has before a byte of weights is read; weights must be finite
(engine/export_files.py, docs/failures.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import load_model_state
from .config import recipe_from_data
from .export_files import CHECKSUMS, FILES
from .model import EchoFM
from .model_card import write_card


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint (a checkpoint, checkpoints/ or run folder: its newest complete checkpoint,
    hashed and read weights-only) -> `out_dir` with model.safetensors, config.json, the model
    card README.md and checksums.sha256 (of the weights and config)."""
    state, recipe_dict = load_model_state(path)
    recipe = recipe_from_data(recipe_dict, file=f"{path} (stored recipe)")
    recipe.validate()
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    model.load_state_dict(state)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # writes checksums.sha256 too
    card = write_card(out_dir, recipe, model, path)
    publish(*(out_dir / f for f in FILES + (CHECKSUMS,)), card)
    return out_dir


def publish(*paths: str | Path) -> None:
    """Give files the mode a plain write would (0644 under the usual umask 022): safetensors
    writes 0600, which keeps weights meant for sharing from the rest of a team."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


def load_export(path: str | Path, *, map_location: str | torch.device = "cpu",
                attn_backend: str | None = None, mask_cfg=None, loss_cfg=None) -> EchoFM:
    """An export directory -> EchoFM in train mode (downstream fine-tunes), checked as
    `EchoFM.from_pretrained` checks it (engine/export_files.py)."""
    return EchoFM.from_pretrained(path, mask_cfg, loss_cfg, map_location, attn_backend).train()
