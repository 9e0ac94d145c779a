"""Training checkpoints: atomic save, keep-last-K, auto-resume, model weights for downstream.

Layout of one run (`train.out_dir/<recipe name>/`):

    checkpoints/
      step_00000100/            a COMPLETE checkpoint (renamed into place last)
        ds/                     DeepSpeed's part: model, (ZeRO-partitioned) optimizer, scheduler
        rank_00000.pt ...       per rank: step, epoch, RNG states, the stream's state
        recipe.yaml             the resolved recipe, for humans
        meta.json               written last: step, world size, recipe, file sizes
      .tmp-step_00000200/       being written (or left by a killed run): never resumed from

Atomicity: every rank writes into `.tmp-step_N/`; after a barrier rank 0 writes
`meta.json` (listing every file with its size) and renames the folder to `step_N/` — a
rename within one filesystem is atomic, so a `step_*` folder is either absent or whole.
Auto-resume still re-checks `meta.json` against the files on disk, so a folder damaged
later (truncated file, deleted file, hand-made partial copy) is skipped, not loaded.
Several ranks on several nodes need the run folder on a shared filesystem.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

CKPT_RE = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"
META = "meta.json"
FORMAT = 1


# ---------------------------------------------------------------- discovery


def _meta(path: Path) -> dict | None:
    """meta.json of a checkpoint folder if it is complete and matches the files, else None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("complete") is not True or meta.get("format") != FORMAT:
        return None
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for rel, size in files.items():
        f = path / rel
        try:
            if f.stat().st_size != size:
                return None
        except OSError:
            return None
    return meta


def is_complete(path: str | Path) -> bool:
    """True when `path` is a checkpoint folder whose meta.json matches its files."""
    return _meta(Path(path)) is not None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete `step_*` folders under `root` (a checkpoints folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path | None:
    """Resolve a user path to one complete checkpoint folder.

    `path` may be a checkpoint folder itself, a `checkpoints/` folder or a run folder
    (then the newest complete checkpoint in it). None when nothing complete is there.
    """
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    return None


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / load


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: str | Path, step: int, *, rank_state: dict, recipe: dict, keep_last: int,
         rank: int, world_size: int) -> Path:
    """Write checkpoint `root/step_<step>` atomically; collective (every rank calls it).

    `rank_state`: this rank's picklable extras (RNG, stream state, counters).
    Keeps the newest `keep_last` complete checkpoints and removes leftovers of killed runs.
    """
    import yaml

    root = Path(root)
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        missing = [r for r in range(world_size) if f"rank_{r:05d}.pt" not in files]
        if missing:
            raise RuntimeError(f"{tmp}: ranks {missing} wrote no state; is the run folder on a "
                               "filesystem shared by every node?")
        meta = {"format": FORMAT, "complete": True, "step": step, "world_size": world_size,
                "time": time.time(), "recipe": recipe, "files": files}
        _fsync_write(tmp / META, json.dumps(meta, indent=1))
        if final.exists():  # re-saving a step (e.g. SIGTERM right after resume)
            trash = root / f".trash-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
        os.rename(tmp, final)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and temp/trash folders."""
    root = Path(root)
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for p in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def load(engine, path: str | Path, *, rank: int, world_size: int) -> dict:
    """Restore engine (model, optimizer, scheduler) from checkpoint folder `path`;
    returns this rank's extras (`rank_state` given to `save`). Collective."""
    path = Path(path)
    meta = _meta(path)
    if meta is None:
        raise UserError(f"{path}: not a complete checkpoint (no valid {META} matching its files)")
    if meta["world_size"] != world_size:
        raise UserError(f"{path}: saved by {meta['world_size']} ranks, this run has {world_size}; "
                        "resume with the same number of processes")
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise UserError(f"{path}/{DS_TAG}: DeepSpeed could not load this checkpoint")
    # Our own file (RNG tuples, stream state): not a foreign pickle.
    return torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- downstream use


def load_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state_dict in float32 on CPU, recipe dict) of a training checkpoint.

    `path`: a checkpoint folder, a run folder or its `checkpoints/` (newest complete one).
    ZeRO 1-3 checkpoints give the fp32 master weights consolidated from their partitions.
    """

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{path}: no complete checkpoint here (expected a step_* folder with {META})")
    meta = _meta(ckpt)
    recipe = meta["recipe"]
    stage = recipe.get("deepspeed", {}).get("zero_stage", 0)
    state = None
    if stage >= 1:
        # The fp32 master weights from the ZeRO partitions (bf16 runs: exact, not rounded).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    if state is None:  # ZeRO-0: the module's own weights (bf16 ones are cast to float32)
        blob = torch.load(ckpt / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)
        state = blob["module"]
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}, recipe


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint -> `out_dir` with model.safetensors + config.json (EchoFM.save_pretrained),
    loadable with `EchoFM.from_pretrained(out_dir)`."""
    from .config import recipe_from_data
    from .model import EchoFM

    state, recipe_dict = load_model_state(path)
    recipe = recipe_from_data(recipe_dict, file=f"{path} (stored recipe)")
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    model.load_state_dict(state)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
