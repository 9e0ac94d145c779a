"""`echofm export`: a training checkpoint -> model.safetensors + config.json (+ checksums.sha256),
the form that `EchoFM.from_pretrained` and downstream runs load without DeepSpeed.

`load_export` is the checked way in (downstream backbones, `embed`): every file against
checksums.sha256 (`sha256sum -c` reads it too), config.json's model bounded in size before
anything is built, and the safetensors header checked against the tensors that model has
(names, dtypes, shapes, offsets inside the file, no overlaps) before a byte of weights is
read; weights must be finite. Each problem is one CheckpointError line naming the file
(docs/failures.md).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

from .checkpoint import load_model_state
from .config import recipe_from_data
from .errors import CheckpointError
from .model import EchoFM

CHECKSUMS = "checksums.sha256"
FILES = ("config.json", "model.safetensors")
MAX_PARAMS = 4_000_000_000
"""Refused above this (ViT-L is 0.3 B): a config.json asking for more is damaged or hostile."""
MAX_HEADER = 100 * 2**20
"""A safetensors JSON header larger than this is refused (ours are ~50 KB)."""
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint (a checkpoint, checkpoints/ or run folder: its newest complete checkpoint,
    hashed and read weights-only) -> `out_dir` with model.safetensors + config.json +
    checksums.sha256."""
    state, recipe_dict = load_model_state(path)
    recipe = recipe_from_data(recipe_dict, file=f"{path} (stored recipe)")
    recipe.validate()
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    model.load_state_dict(state)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    write_checksums(out_dir)
    publish(*(out_dir / f for f in FILES + (CHECKSUMS,)))
    return out_dir


def publish(*paths: str | Path) -> None:
    """Give files the mode a plain write would (0644 under the usual umask 022): safetensors
    writes 0600, which keeps weights meant for sharing from the rest of a team."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


def _sha256(path: Path) -> str:
    from echofm.loaders.shards import sha256_file

    return sha256_file(path)


def write_checksums(out_dir: str | Path) -> Path:
    """checksums.sha256 for an export directory (`sha256sum` format)."""
    out = Path(out_dir)
    p = out / CHECKSUMS
    p.write_text("".join(f"{_sha256(out / f)}  {f}\n" for f in FILES))
    return p


def check_checksums(path: str | Path) -> bool:
    """Every export file against checksums.sha256 -> True; False (with a warning) when the
    export has none (written before checksums); CheckpointError on a mismatch."""
    path = Path(path)
    p = path / CHECKSUMS
    if not p.is_file():
        warnings.warn(f"{path}: no {CHECKSUMS}: its files cannot be checked for damage or tampering "
                      "(re-export to add them)", stacklevel=2)
        return False
    want = {}
    for line in p.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        want[name.strip().lstrip("*")] = digest.strip().lower()
    for f in FILES:
        if f not in want:
            raise CheckpointError(f"{p}: lists no sha256 for {f}")
        got = _sha256(path / f)
        if got != want[f]:
            raise CheckpointError(f"{path / f}: sha256 {got[:16]}... does not match {CHECKSUMS} "
                                  f"({want[f][:16]}...): the file was altered or damaged")
    return True


def estimate_params(cfg) -> int:
    """Parameters of a resolved ModelConfig, from its sizes alone (nothing built): bounds a
    config.json before the model is constructed."""
    d, dd, r = cfg.embed_dim, cfg.decoder_embed_dim, cfg.mlp_ratio
    tokens = (cfg.img_size // cfg.patch_size) ** 2 * max(cfg.num_frames // cfg.tubelet, 1)
    patch = cfg.in_chans * cfg.tubelet * cfg.patch_size ** 2
    block = lambda w: (4 + 2 * r) * w * w  # noqa: E731  attention + MLP weights
    return int(cfg.depth * block(d) + cfg.decoder_depth * block(dd) + (tokens + patch) * (d + dd)
               + dd * patch * cfg.pred_t_dim)


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, list[int], list[int]]]:
    """{name: (dtype, shape, [start, end])} of a safetensors file, every length and offset
    checked against the file's size (nothing else is read); CheckpointError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: damaged safetensors header ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    data, out, spans = size - 8 - n, {}, []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], [int(s) for s in t["shape"]], [int(o) for o in t["data_offsets"]]
            item = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name[:60]!r}: damaged header entry") from None
        if min(shape, default=0) < 0 or not 0 <= a <= b <= data or b - a != math.prod(shape) * item:
            raise CheckpointError(f"{path}: tensor {name[:60]!r}: offsets [{a}, {b}] do not hold a {dtype} "
                                  f"{shape} inside the file's {data} data bytes")
        out[name] = (dtype, shape, [a, b])
        spans.append((a, b, name))
    spans.sort()
    for (_, b0, n0), (a1, _, n1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise CheckpointError(f"{path}: tensors {n0[:60]!r} and {n1[:60]!r} overlap")
    return out


def _model_from_config(path: Path, attn_backend: str | None):
    """config.json -> (ModelConfig, MaskConfig, LossConfig), the model bounded in size."""
    from .losses import LossConfig
    from .masking import MaskConfig
    from .model import ModelConfig, _section

    f = path / "config.json"
    if f.stat().st_size > 2**20:
        raise CheckpointError(f"{f}: {f.stat().st_size} bytes: not an EchoFM config.json")
    try:
        data = json.loads(f.read_text())
        if data.get("format") != "echofm" or not isinstance(data.get("model"), dict):
            raise ValueError("no 'format': 'echofm' / 'model'")
        kw = _section(ModelConfig, data["model"], f, "model")
        if attn_backend is not None:
            kw["attn_backend"] = attn_backend
        mcfg = ModelConfig(**kw)
        mcfg.validate()
        res = mcfg.resolved()
        sizes = ("img_size", "patch_size", "num_frames", "tubelet", "embed_dim", "depth", "num_heads",
                 "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "pred_t_dim", "in_chans")
        if any(not isinstance(getattr(res, k), int) or getattr(res, k) < 1 for k in sizes):
            raise ValueError(f"model sizes must be positive integers: {[k for k in sizes if not isinstance(getattr(res, k), int) or getattr(res, k) < 1]}")
        n = estimate_params(res)
        if n > MAX_PARAMS:
            raise ValueError(f"asks for a model of ~{n / 1e9:.1f} B parameters ({4 * n / 2**30:.0f} GiB), "
                             f"more than {MAX_PARAMS / 1e9:.0f} B: refused")
        mask = MaskConfig(**_section(MaskConfig, data.get("mask", {}), f, "mask"))
        loss = LossConfig(**_section(LossConfig, data.get("loss", {}), f, "loss"))
    except (ValueError, TypeError, AttributeError, KeyError, ArithmeticError) as e:  # e.g. patch_size 0
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
    return mcfg, mask, loss


def load_export(path: str | Path, *, map_location: str | torch.device = "cpu",
                attn_backend: str | None = None) -> EchoFM:
    """An export directory -> EchoFM, checked (see the module docstring)."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in FILES:
        if not (path / f).is_file():
            raise CheckpointError(f"{path / f}: missing (expected an `echofm export` directory)")
    check_checksums(path)
    mcfg, mask, loss = _model_from_config(path, attn_backend)
    with torch.device("meta"):  # shapes and dtypes only: nothing allocated
        want = {k: (v.dtype, list(v.shape)) for k, v in EchoFM(mcfg, mask, loss).state_dict().items()}
    weights = path / "model.safetensors"
    have = read_safetensors_header(weights)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(f"{weights}: does not fit config.json's model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}" + (" ..." if len(missing) + len(extra) > 6 else ""))
    for k, (dtype, shape) in want.items():
        hd, hs, _ = have[k]
        if _DTYPES[hd] != dtype or hs != shape:
            raise CheckpointError(f"{weights}: tensor {k!r} is {hd} {hs}; config.json's model has "
                                  f"{str(dtype).replace('torch.', '')} {shape}")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors' own checks (alignment, ...) beyond the header's
        raise CheckpointError(f"{weights}: cannot read ({str(e).splitlines()[0][:120]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{weights}: tensor {bad!r} holds NaN or inf")
    model = EchoFM(mcfg, mask, loss)
    model.load_state_dict(state)
    return model.to(map_location)
