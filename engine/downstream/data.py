"""What a downstream run needs from the shards besides clips: the sample list with labels,
the label-fraction draw over patients, and which sampled frames carry a mask.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from echofm.loaders.errors import DataError
from echofm.loaders.shards import read_index, read_manifest


def list_samples(shard_dir: str | Path, split: str) -> list[dict]:
    """The json of every sample of `split` ('all' for every split), read by seeking to the
    json member through the DALI index, so video bytes are never read."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    out = []
    for s in manifest["shards"]:
        if split != "all" and s.get("split") != split:
            continue
        tar, idx = shard_dir / s["tar"], shard_dir / s["idx"]
        try:
            index = read_index(idx)
        except (OSError, ValueError) as e:
            raise DataError(f"{idx}: unreadable DALI index ({e})") from e
        with open(tar, "rb") as f:
            for comps in index:
                js = [c for c in comps if c[0] == "json"]
                if not js:
                    raise DataError(f"{tar}: sample {comps[0][3] if comps else '?'} has no .json")
                _, off, size, name = js[0]
                f.seek(off)
                try:
                    meta = json.loads(f.read(size))
                except json.JSONDecodeError as e:
                    raise DataError(f"{tar}: {name}: bad json ({e})") from e
                meta.setdefault("key", name.rsplit("/", 1)[-1].split(".", 1)[0])
                out.append(meta)
    return out


def present_splits(shard_dir: str | Path) -> dict[str, int]:
    """{split: samples} from the manifest (a missing or bad manifest is a DataError)."""
    return {k: int(v) for k, v in read_manifest(shard_dir)["splits"].items()}


def patient_of(meta: dict) -> str:
    return str(meta.get("patient") or meta.get("key"))


def label_fraction_patients(metas: list[dict], stratum: Callable[[dict], str | None],
                            fraction: float, seed: int) -> set[str]:
    """Draw `fraction` of the labelled training PATIENTS, stratified and seeded.

    stratum(meta) gives a sample's class (None = no label). A patient's stratum is its
    rarest class, so patients with rare views are drawn within that view. Each stratum
    gives ceil(fraction * n) patients (>= 1); then any class still missing gets one
    patient that has it, so every class is kept at any fraction.
    """
    classes_of: dict[str, set[str]] = defaultdict(set)
    for m in metas:
        c = stratum(m)
        if c is not None:
            classes_of[patient_of(m)].add(c)
    if fraction >= 1.0:
        return set(classes_of)
    count = defaultdict(int)
    for cs in classes_of.values():
        for c in cs:
            count[c] += 1
    strata: dict[str, list[str]] = defaultdict(list)
    for p in sorted(classes_of):
        strata[min(classes_of[p], key=lambda c: (count[c], c))].append(p)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for c in sorted(strata):
        ps = strata[c]
        k = max(1, math.ceil(fraction * len(ps) - 1e-9))
        chosen.update(ps[i] for i in rng.permutation(len(ps))[:k])
    for c in sorted(count):
        if not any(c in classes_of[p] for p in chosen):
            has = sorted(p for p in classes_of if c in classes_of[p])
            chosen.add(has[int(rng.integers(len(has)))])
    return chosen


def annotated_frames(meta: dict, frames_index: torch.Tensor) -> torch.Tensor:
    """bool [T]: which sampled frames (source indices `frames_index` int [T]) have a mask.

    The json lists annotated source frames in "seg_frames"; a sample without the list but
    with a mask is taken as fully annotated."""
    frames = meta.get("seg_frames")
    if frames is None:
        return torch.full(frames_index.shape, bool(meta.get("has_seg", False)))
    ann = torch.as_tensor(sorted(int(f) for f in frames), dtype=frames_index.dtype)
    return torch.isin(frames_index.cpu(), ann)
