"""The files of an export folder (model.safetensors + config.json + checksums.sha256) checked
before anything is built from them: checksums, the safetensors header's lengths and offsets, the
header against the tensors a model has, finite weights, a bound on the model a config asks for.
A leaf of the engine (only errors and the loaders' hashing), so that model.py's
`from_pretrained` and export.py share it. Each problem is one CheckpointError line naming the
file (docs/failures.md).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError

CHECKSUMS = "checksums.sha256"
FILES = ("config.json", "model.safetensors")
MAX_PARAMS = 4_000_000_000
"""Refused above this (ViT-L is 0.3 B): a config.json asking for more is damaged or hostile."""
MAX_HEADER = 100 * 2**20
"""A safetensors JSON header larger than this is refused (ours are ~50 KB)."""
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _sha256(path: Path) -> str:
    from echofm.loaders.digest import sha256_file

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

def check_layout(weights: Path, want: dict[str, tuple[torch.dtype, list[int]]]) -> None:
    """The safetensors header of `weights` against the {name: (dtype, shape)} a model has;
    CheckpointError naming the first tensor that differs. Reads the header only."""
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


def read_finite(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU), every float tensor finite; CheckpointError else."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors' own checks (alignment, ...) beyond the header's
        raise CheckpointError(f"{weights}: cannot read ({str(e).splitlines()[0][:120]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{weights}: tensor {bad!r} holds NaN or inf")
    return state
