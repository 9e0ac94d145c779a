"""Where a run continues from: the checkpoint to resume (`resume_point`, hashed first) and
what a resume may change (`resume_changes`: refused in one line, or noted).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import checkpoint as ckpt
from .errors import UserError

__all__ = ["resume_changes", "resume_point"]


def resume_point(resume: str | None, run_dir: Path, *, folder_key: str = "train.out_dir") -> Path | None:
    """The checkpoint to continue from (hashed: damaged ones are skipped with a message when
    searching a folder, an error when named directly), or None for a fresh run (refused
    where `run_dir` has checkpoints; `folder_key` names the recipe key that places it)."""
    ckpt_root = run_dir / "checkpoints"
    say = print if os.environ.get("RANK", "0") == "0" else (lambda _m: None)
    if resume == "auto":
        start = ckpt.find_checkpoint(ckpt_root, check=True, log=say)
        if start is None and ckpt.complete_checkpoints(ckpt_root):
            raise UserError(f"{ckpt_root}: every checkpoint is damaged (see above); move them away to "
                            "start afresh, or resume from a copy with --resume PATH")
        return start
    if resume:
        start = ckpt.find_checkpoint(resume, check=True, log=say)
        if start is None:
            raise UserError(f"--resume {resume}: no complete checkpoint there")
        return start
    if ckpt.complete_checkpoints(ckpt_root):
        raise UserError(f"{run_dir}: already has checkpoints; continue it with --resume auto, or "
                        f"pick another {folder_key} or name")
    return None


def resume_changes(recipe, world: int, start: Path, meta: dict) -> list[str]:
    """Notes for the settings a resume may change (the stream adds its own); UserError
    naming the setting for those DeepSpeed cannot load into."""
    ds = (meta.get("recipe") or {}).get("deepspeed") or {}
    cur, saved_world = recipe.deepspeed, int(meta["world_size"])
    stage = ds.get("zero_stage", cur.zero_stage)
    if stage != cur.zero_stage:
        raise UserError(f"{start}: saved with deepspeed.zero_stage={stage}, this run has {cur.zero_stage}; "
                        "DeepSpeed cannot load one ZeRO stage's checkpoint into another: resume with "
                        f"--set deepspeed.zero_stage={stage}")
    if saved_world != world and stage > 0:
        raise UserError(f"{start}: saved by {saved_world} ranks with deepspeed.zero_stage={stage}, whose "
                        f"optimizer state is split {saved_world} ways; DeepSpeed cannot re-split it for "
                        f"{world} rank(s): resume on {saved_world} ranks (an elastic resume needs "
                        "deepspeed.zero_stage=0)")
    notes = []
    accum = ds.get("grad_accum", cur.grad_accum)
    if accum != cur.grad_accum:
        notes.append(f"deepspeed.grad_accum {accum} -> {cur.grad_accum}")
    saved_batch = (meta.get("recipe") or {}).get("data", {}).get("batch_size", recipe.data.batch_size)
    before, now = saved_batch * accum * saved_world, recipe.data.batch_size * cur.grad_accum * world
    if before != now:
        notes.append(f"global batch {before} -> {now} clips per step (the peak lr scales with it)")
    return notes
