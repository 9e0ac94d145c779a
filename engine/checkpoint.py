"""Training checkpoints: atomic save, keep-last-K, auto-resume, integrity, safe loading.

Layout of one run (`train.out_dir/<recipe name>/`):

    checkpoints/
      step_00000100/            a COMPLETE checkpoint (renamed into place last)
        ds/                     DeepSpeed's part: model, (ZeRO-partitioned) optimizer (the lr follows from the step)
        rank_00000.pt ...       per rank: step, epoch, RNG states, the stream's state
        recipe.yaml             the resolved recipe, for humans
        meta.json               written last: step, world size, recipe, every file's size and sha256
      .tmp-step_00000200/       being written (or left by a killed run): never resumed from

Atomicity: every rank writes into `.tmp-step_N/`; after a barrier rank 0 writes
`meta.json` (listing every file with its size and sha256) and renames the folder to
`step_N/` — a rename within one filesystem is atomic, so a `step_*` folder is either absent
or whole. Several ranks on several nodes need the run folder on a shared filesystem.

Integrity: listing checkpoints compares sizes only (cheap); a checkpoint is hashed before
it is loaded (`verify`), so a flipped byte is an error naming the file, and auto-resume
skips a damaged checkpoint (saying so) for the previous complete one.

Safety: unpickling can run arbitrary code, so no file of a checkpoint is unpickled. Every
`.pt` holds tensors and plain data and is read with `torch.load(weights_only=True)`: ours
directly, DeepSpeed's (whose loaders pass weights_only=False) inside `safe_loading()`,
which forces weights-only loading and allows only the benign DeepSpeed classes of
`_ds_safe_globals`. Before that, every `.pt` is scanned for the classes it would build
(`check_pickles`), so a file that needs more is refused with its name. Checkpoints of an
older format, or files that need pickle, are converted once by `echofm convert` (`convert`),
which the user runs knowingly on files they trust.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echofm.loaders.digest import sha256_file

from .errors import CheckpointError

CKPT_RE = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"
META = "meta.json"
FORMAT = 2
"""1: sizes only, numpy RNG state pickled (refused; `echofm convert` upgrades it).
2: sizes + sha256 per file, plain data only."""
KNOWN_FORMATS = (1, 2)
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _convert_hint(path: Path | str) -> str:
    return (f"if you trust its origin, convert it once with `echofm convert {path} --out NEW_FOLDER` "
            "(that command unpickles it) and use NEW_FOLDER")


# ---------------------------------------------------------------- discovery


def _sizes(meta: dict) -> dict[str, int]:
    """{relative path: size} of format 1 ({rel: size}) and format 2 ({rel: {bytes, sha256}})."""
    return {rel: (v["bytes"] if isinstance(v, dict) else v) for rel, v in meta["files"].items()}


def _meta(path: Path) -> dict | None:
    """meta.json of a checkpoint folder if it is complete and its files have the listed
    sizes (no hashing), else None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("complete") is not True or meta.get("format") not in KNOWN_FORMATS:
        return None
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for rel in files:  # a hostile meta.json must not make echofm read or write outside the folder
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
            raise CheckpointError(f"{path / META}: file entry {rel[:80]!r} points outside the checkpoint folder: "
                                  "refused")
    try:
        sizes = _sizes(meta)
    except (KeyError, TypeError):
        return None
    for rel, size in sizes.items():
        try:
            if (path / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    return meta


def is_complete(path: str | Path) -> bool:
    """True when `path` is a checkpoint folder whose meta.json matches its files' sizes."""
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


def verify(path: str | Path) -> dict:
    """Hash every file of checkpoint folder `path` against its meta.json; returns the meta.

    Raises CheckpointError naming the first damaged, missing or resized file, or saying
    that the checkpoint is of an older format (no hashes, pickled RNG state)."""
    path = Path(path)
    meta = _meta(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (no valid {META} matching its files)")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path}: written by an older echofm (checkpoint format {meta['format']}, "
                              f"this one reads {FORMAT}): its files carry no sha256 and its RNG state "
                              f"is pickled; {_convert_hint(path)}")
    for rel, want in meta["files"].items():
        if not isinstance(want, dict) or not isinstance(want.get("sha256"), str):
            raise CheckpointError(f"{path / META}: no sha256 recorded for {rel} (damaged {META})")
        if sha256_file(path / rel) != want["sha256"]:
            raise CheckpointError(f"{path / rel}: sha256 differs from {META} (the file was damaged or "
                                  "changed after it was written); do not load it, use another checkpoint")
    return meta


def find_checkpoint(path: str | Path, *, check: bool = False,
                    log: Callable[[str], None] | None = None) -> Path | None:
    """Resolve a user path to one complete checkpoint folder.

    `path` may be a checkpoint folder itself, a `checkpoints/` folder or a run folder
    (then the newest complete checkpoint in it). None when nothing complete is there.
    check=True hashes the candidate (`verify`): a checkpoint folder given directly that is
    damaged raises; in a run or checkpoints folder a damaged checkpoint is skipped (`log`
    says so) for the previous complete one.
    """
    path = Path(path)
    if is_complete(path):
        if check:
            verify(path)
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        for cand in reversed(found):
            if not check:
                return cand
            try:
                verify(cand)
                return cand
            except CheckpointError as e:
                if (_meta(cand) or {}).get("format", FORMAT) != FORMAT:
                    raise  # an old checkpoint is not damaged: say how to convert it
                if log is not None:
                    log(f"[echofm] skipping damaged checkpoint: {e}")
        if found:
            return None
    return None


# ---------------------------------------------------------------- safe loading


def _ds_safe_globals() -> list:
    """The classes DeepSpeed's checkpoint files build (ZeRO / loss scaling bookkeeping):
    plain-data holders, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def safe_loading():
    """Every torch.load inside runs with weights_only=True (also DeepSpeed's, which asks for
    weights_only=False: torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over the argument),
    allowing only `_ds_safe_globals` beyond torch's own allow-list."""
    old = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_ds_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = old


def unsafe_globals(file: str | Path) -> list[str]:
    """Classes/functions the pickle in `file` (a torch.save file) would call beyond the
    weights-only allow-list; read statically, nothing is executed. ['<reason>'] when the
    file is not a torch.save zip (legacy format: only pickle reads it)."""
    try:
        with torch.serialization.safe_globals(_ds_safe_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
    except (ValueError, RuntimeError, pickle.UnpicklingError) as e:
        return [f"<not a torch.save zip file: {str(e).splitlines()[0]}>"]


def check_pickles(path: Path, meta: dict) -> None:
    """Refuse checkpoint `path` if any of its .pt files would build more than plain data."""
    for rel in meta["files"]:
        if rel.endswith(".pt"):
            bad = unsafe_globals(path / rel)
            if bad:
                raise CheckpointError(f"{path / rel}: refusing to load: it needs pickle to build "
                                      f"{', '.join(bad[:4])}, and unpickling can run arbitrary code; "
                                      f"{_convert_hint(path)}")


def _refused(path: Path, e: Exception) -> CheckpointError:
    reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln),
                  str(e).splitlines()[0] if str(e) else type(e).__name__)
    return CheckpointError(f"{path}: refusing to load: a file needs pickle beyond plain data ({reason}); "
                           f"{_convert_hint(path)}")


def load_plain(file: str | Path) -> Any:
    """torch.load(weights_only=True) of one of our files, on the CPU; refusal is a CheckpointError."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(Path(file), e) from None


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states of this process, as plain data
    (tuples, ints, tensors) that weights-only loading reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save


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


def _write_cause(e: BaseException, folder: Path) -> str:
    """A one-phrase cause of a failed checkpoint write (torch says "unexpected pos" on a full disk)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in msg:
        return f"disk full (no space left on device; {free})"
    if "unexpected pos" in msg or "write failed" in msg:
        return f"the write failed, as on a full disk ({free}; torch: {msg})"
    return msg


class _NamedWrites:
    """Wraps DeepSpeed's checkpoint writer on one engine so a failed write names its file."""

    def __init__(self, engine) -> None:
        self.engine, self.current = engine, None

    def __enter__(self):
        ce = getattr(self.engine, "checkpoint_engine", None)
        self.orig = getattr(ce, "save", None)
        if self.orig is not None:
            def save(state_dict, path, *a, **kw):
                self.current = Path(path)
                return self.orig(state_dict, path, *a, **kw)
            ce.save = save
        return self

    def __exit__(self, *exc):
        if self.orig is not None:
            del self.engine.checkpoint_engine.save  # back to the class's method
        return False


def _hash_files(folder: Path) -> dict[str, dict]:
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _write_failed(file: Path, step: int, e: BaseException, tmp: Path) -> CheckpointError:
    return CheckpointError(f"{file}: writing checkpoint step {step} failed: {_write_cause(e, tmp)}; the "
                           "previous complete checkpoint is intact (free space, then --resume auto)")


def _write_parts(engine, tmp: Path, step: int, rank_state: dict, rank: int) -> None:
    """This rank's files of the checkpoint; a failed write raises CheckpointError naming the file."""
    named = _NamedWrites(engine)
    try:
        with named:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"step": step}, save_latest=False)
    except (OSError, RuntimeError) as e:
        raise _write_failed(named.current or tmp / DS_TAG, step, e, tmp) from None
    rank_file = tmp / f"rank_{rank:05d}.pt"
    try:
        torch.save(rank_state, rank_file)
    except (OSError, RuntimeError) as e:
        raise _write_failed(rank_file, step, e, tmp) from None


def _finish(tmp: Path, final: Path, step: int, recipe: dict, world_size: int) -> None:
    """Rank 0: recipe.yaml + meta.json (hashes of every file), then the atomic rename."""
    import yaml

    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    files = _hash_files(tmp)
    missing = [r for r in range(world_size) if f"rank_{r:05d}.pt" not in files]
    if missing:
        raise CheckpointError(f"{tmp}: ranks {missing} wrote no state; is the run folder on a "
                              "filesystem shared by every node?")
    meta = {"format": FORMAT, "complete": True, "step": step, "world_size": world_size,
            "time": time.time(), "recipe": recipe, "files": files}
    _fsync_write(tmp / META, json.dumps(meta, indent=1))
    if final.exists():  # re-saving a step (e.g. SIGTERM right after resume)
        trash = final.with_name(f".trash-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(tmp, final)


def save(engine, root: str | Path, step: int, *, rank_state: dict, recipe: dict, keep_last: int,
         rank: int, world_size: int) -> Path:
    """Write checkpoint `root/step_<step>` atomically; collective (every rank calls it).

    `rank_state`: this rank's extras (RNG, stream state, counters) as plain data: tensors,
    numbers, strings, lists, tuples, dicts (weights-only loading reads nothing else).
    Keeps the newest `keep_last` complete checkpoints and removes leftovers of killed runs.
    A failed write (e.g. a full disk) removes the partial folder and raises CheckpointError
    naming the file and the cause; earlier checkpoints are untouched.
    """
    root = Path(root)
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        _write_parts(engine, tmp, step, rank_state, rank)
        _barrier()
        if rank == 0:
            try:
                _finish(tmp, final, step, recipe, world_size)
            except OSError as e:
                raise _write_failed(tmp / META, step, e, tmp) from None
            prune(root, keep_last)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; never resumed from anyway
        raise
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


# ---------------------------------------------------------------- load


def _model_diff(saved: dict, current: dict | None) -> str:
    if not current:
        return ""
    a, b = saved.get("model", {}), current.get("model", {})
    diff = [f"model.{k}={a.get(k)!r} (recipe: {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return f"; it was trained with {', '.join(diff)}" if diff else ""


def _mismatch(path: Path, e: RuntimeError, meta: dict, recipe: dict | None) -> CheckpointError | None:
    """A one-line error for a checkpoint whose tensors do not fit the model, else None."""
    text = str(e)
    if "state_dict" not in text and "size mismatch" not in text:
        return None
    first = next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), text.splitlines()[0])
    return CheckpointError(f"{path}: this checkpoint does not fit the recipe's model ({first[:200]})"
                           f"{_model_diff(meta['recipe'], recipe)}; resume with the model section it was "
                           "trained with")


def load(engine, path: str | Path, *, rank: int, world_size: int, recipe: dict | None = None,
         verified: bool = False, elastic: bool = False) -> dict:
    """Restore engine (model, optimizer, scheduler) from checkpoint folder `path`;
    returns this rank's extras (`rank_state` given to `save`). Collective.

    The files are hashed first (`verify`; skipped when `verified`, e.g. by `find_checkpoint`)
    and read weights-only. `recipe` (the current one, as a dict) names the differing model
    settings when the checkpoint does not fit the model. `elastic`: another world size is
    allowed (the caller checked that its state carries over, docs/data.md); a rank the
    checkpoint has no file for gets rank 0's extras.
    """
    path = Path(path)
    meta = _meta(path) if verified else verify(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (no valid {META} matching its files)")
    if meta["world_size"] != world_size and not elastic:
        raise CheckpointError(f"{path}: saved by {meta['world_size']} ranks, this run has {world_size}; "
                              "resume with the same number of processes")
    check_pickles(path, meta)
    try:
        with safe_loading():
            loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None
    except RuntimeError as e:
        err = _mismatch(path, e, meta, recipe)
        if err is None:
            raise
        raise err from None
    if loaded is None:
        raise CheckpointError(f"{path}/{DS_TAG}: DeepSpeed could not load this checkpoint")
    return load_plain(path / f"rank_{rank if rank < meta['world_size'] else 0:05d}.pt")


# ---------------------------------------------------------------- downstream use


def load_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state_dict in float32 on CPU, recipe dict) of a training checkpoint.

    `path`: a checkpoint folder, a run folder or its `checkpoints/` (newest complete one).
    ZeRO 1-3 checkpoints give the fp32 master weights consolidated from their partitions.
    The files are hashed and read weights-only (see the module docstring).
    """
    ckpt = find_checkpoint(path, check=True, log=print)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint here (expected a step_* folder with {META})")
    meta = _meta(ckpt)
    check_pickles(ckpt, meta)
    recipe = meta["recipe"]
    stage = recipe.get("deepspeed", {}).get("zero_stage", 0)
    state = None
    try:
        if stage >= 1:
            # The fp32 master weights from the ZeRO partitions (bf16 runs: exact, not rounded).
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with safe_loading():
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        if state is None:  # ZeRO-0: the module's own weights (bf16 ones are cast to float32)
            state = load_plain(ckpt / DS_TAG / "mp_rank_00_model_states.pt")["module"]
    except pickle.UnpicklingError as e:
        raise _refused(ckpt, e) from None
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}, recipe


# ---------------------------------------------------------------- convert (trusted files only)


def to_plain(obj: Any, where: str = "") -> Any:
    """Pickled Python objects -> what weights-only loading reads: numpy arrays become tensors,
    numpy scalars numbers, argparse.Namespace and dict subclasses dicts, sets and other
    tuples lists/tuples; tensors, numbers, strings and the allowed DeepSpeed classes stay.
    Anything else is a ValueError naming its place."""
    import argparse
    from collections import OrderedDict

    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype,
                                       torch.device)) or type(obj) in _ds_safe_globals():
        return obj
    if isinstance(obj, np.ndarray):
        a = obj.astype(np.int64) if obj.dtype.kind == "u" and obj.dtype.itemsize > 1 else obj
        return torch.from_numpy(np.ascontiguousarray(a))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        out = {k: to_plain(v, f"{where}.{k}") for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        out = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if isinstance(obj, tuple) else out
    raise ValueError(f"{where or '<top>'}: a {type(obj).__module__}.{type(obj).__qualname__} "
                     "has no plain-data form")


def _convert_file(src: Path, dst: Path, torch_file: bool) -> bool:
    """Copy one file; a torch file that needs pickle is unpickled (trusted) and re-saved as
    plain data. True when it was rewritten."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not torch_file or not unsafe_globals(src):
        shutil.copy2(src, dst)
        return False
    obj = torch.load(src, map_location="cpu", weights_only=False)  # noqa: S614 (the user trusts it)
    try:
        torch.save(to_plain(obj), dst)
    except ValueError as e:
        raise CheckpointError(f"{src}: cannot convert: {e}") from None
    left = unsafe_globals(dst)
    if left:
        raise CheckpointError(f"{src}: cannot convert: still needs {', '.join(left)}")
    return True


def convert(src: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """`echofm convert`: rewrite a TRUSTED checkpoint (UNPICKLES it: only for files whose
    origin you trust) into this format: plain-data files, sha256 per file in meta.json.

    src: a checkpoint / run folder (old format or files that need pickle), or a single .pt/.pth
    file (e.g. an official checkpoint with pickled extras). out: a new folder (or file).
    Returns (out, the files that were rewritten).
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; pick a new --out")
    if src.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        return out, [str(src)] if _convert_file(src, out, torch_file=True) else []
    ckpt = find_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"{src}: no complete checkpoint here (a step_* folder with {META}, or a file)")
    meta = _meta(ckpt)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    rewritten = [rel for rel in sorted(meta["files"]) if _convert_file(ckpt / rel, tmp / rel, rel.endswith(".pt"))]
    meta.update(format=FORMAT, files=_hash_files(tmp), converted_from=str(ckpt.resolve()))
    _fsync_write(tmp / META, json.dumps(meta, indent=1))
    os.rename(tmp, out)
    return out, rewritten
