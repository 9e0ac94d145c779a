"""Backbone features of a whole split, computed once (eval-mode stream, no augmentation).

A linear probe reads every clip through the frozen backbone exactly once; the head then
trains on these tensors in seconds. The same function produces the val/test features
that `evaluate` recomputes, so both see identical inputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from echofm.loaders.errors import DataError

from . import backbone as backbones
from .data import annotated_frames


@dataclass(kw_only=True, slots=True)
class FeatureSet:
    """One split's clips through one backbone."""

    feats: torch.Tensor
    """float32 [N, F] pooled features, or float16 [N, T', h, w, D] token grids (seg)."""
    metas: list[dict]
    """Sample json of each clip (with 'clip_index' when several clips per video)."""
    seg: torch.Tensor | None = None
    """uint8 [N, T, H, W] masks of the sampled frames (seg only)."""
    valid: torch.Tensor | None = None
    """bool [N, T]: sampled frame has an annotation (seg only)."""
    frames: torch.Tensor | None = None
    """uint8 [n, T, H, W, C]: the first few clips, for overlay figures (seg only)."""


def stream_config(data, split: str, clips: int, *, batch: int, seg: bool):
    """The recipe's StreamConfig turned into a deterministic evaluation read of `split`."""
    return dataclasses.replace(data, split=split, eval_clips=clips, shuffle=False, flip=False,
                               random_resized_crop=None, batch_size=batch, segmentation=seg)


def forward_batches(model, cfg, *, device: torch.device, forward, keys=None):
    """Yield (batch, forward(model, batch["video"])) for every batch of a deterministic
    evaluation read (`cfg`: a StreamConfig from `stream_config`) of `keys` (None: the whole
    split) on `device`, the model in eval mode without gradients. Shared by the feature
    cache and `echofm embed`; says what the stream skipped as damaged."""
    from echofm.loaders.stream import ClipStream

    stream = ClipStream(cfg, train=False, rank=0, world_size=1, device=device, keys=keys)
    model = model.to(device).eval()
    for b in stream:
        with torch.no_grad():  # only around the forward: the consumer's code runs in its own mode
            out = forward(model, b["video"])
        yield b, out
    if stream.damaged:  # data.on_error=skip: say what is missing from these features
        stream.check_dropped()
        print(f"[echofm] split {cfg.split!r}: {len(stream.damaged)} damaged sample(s) skipped: "
              + "; ".join(list(stream.damaged.values())[:3]), flush=True)


def extract(model, data, split: str, clips: int, *, features: str, grid: bool,
            device: torch.device, batch: int = 8, keep_frames: int = 4) -> FeatureSet:
    """Run every clip of `split` (`clips` per video) through `model` (eval mode).

    data: the recipe's StreamConfig. grid=True keeps token grids + masks (segmentation)."""
    cfg = stream_config(data, split, clips, batch=batch, seg=grid)
    feats, metas, segs, valid, frames = [], [], [], [], []
    for b, f in forward_batches(model, cfg, device=device,
                                forward=lambda m, video: backbones.encode(m, video, features, grid=grid)):
        feats.append(f.to("cpu", torch.float16 if grid else torch.float32))
        metas += [dict(m) for m in b["meta"]]
        if grid:
            segs.append(b["seg"].cpu())
            valid.append(torch.stack([annotated_frames(m, fi) for m, fi in
                                      zip(b["meta"], b["frames_index"].cpu())]))
            if sum(len(x) for x in frames) < keep_frames:
                frames.append(b["video"][:keep_frames].cpu())
    if not metas:
        raise DataError(f"{data.shards}: split {split!r} has no samples")
    return FeatureSet(feats=torch.cat(feats), metas=metas,
                      seg=torch.cat(segs) if grid else None,
                      valid=torch.cat(valid) if grid else None,
                      frames=torch.cat(frames)[:keep_frames] if grid else None)


def cached_extract(model, info: dict, data, split: str, clips: int, *, cache_dir: str | Path | None,
                   **kw) -> FeatureSet:
    """`extract`, memoised on disk under cache_dir by what the features depend on: the
    shards' content (the manifest's sha256, which lists every shard's sha256), the backbone's
    weights (fingerprint), the stream settings, split, clips and feature kind. Never by the
    shard path: data ingested into the same folder changes the key. Repeated probes (label
    fractions, seeds, heads) never re-run the backbone."""
    if cache_dir is None:
        return extract(model, data, split, clips, **kw)
    path = Path(cache_dir) / f"features-{split}-{cache_key(info, data, split, clips, kw)}.pt"
    if path.is_file():
        return FeatureSet(**torch.load(path, weights_only=True))
    fs = extract(model, data, split, clips, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({f.name: getattr(fs, f.name) for f in dataclasses.fields(fs)}, tmp)
    tmp.replace(path)
    return fs


def cache_key(info: dict, data, split: str, clips: int, kw: dict) -> str:
    """16 hex digits of the sha256 of everything `extract`'s result depends on."""
    from echofm.loaders.shards import manifest_sha256

    from ..yaml_io import to_dict

    settings = {k: v for k, v in to_dict(data).items() if k != "shards"}  # the content, not the path
    key = json.dumps({"manifest": manifest_sha256(data.shards), "backbone": info["fingerprint"],
                      "data": settings, "split": split, "clips": clips, "features": kw.get("features"),
                      "grid": kw.get("grid")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
