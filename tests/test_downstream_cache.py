"""Caches are keyed by content, never by a path alone.

Regression: the probe's feature cache was keyed by the shard path, so after more data was
ingested into the same folder a re-run scored the old test videos. (The synthetic corpus
cache: test_corpus.py.)"""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from echofm.engine.config import load_recipe
from echofm.engine.downstream import features
from echofm.engine.downstream.backbone import fingerprint
from echofm.engine.model import EchoFM
from echofm.loaders.shards import (SampleRecord, ShardWriter, add_shard, new_manifest, pack_nframes,
                                   read_manifest, write_manifest)
from echofm.loaders.video_io import encode_video

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.num_frames=8", "model.img_size=32", "model.patch_size=8", "model.tubelet=2",
         "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.pred_t_dim=4",
         "data.num_frames=8", "data.size=32", "data.num_threads=1"]


def _ingest(d: Path, index: int, keys: list[str]) -> None:
    """What ingest does when new videos arrive: a new test shard, the manifest rewritten."""
    d.mkdir(exist_ok=True)
    m = read_manifest(d) if (d / "manifest.json").exists() else new_manifest(
        codec="vp9", video_ext="webm", height=32, width=32, settings={})
    w = ShardWriter(out_dir=d, index=index, split="test")
    for k in keys:
        rng = np.random.default_rng(len(k))
        video = encode_video(rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), 25.0, "vp9")
        meta = {"key": k, "frames": 10, "split": "test", "patient": k, "view": "A4C"}
        w.add(k, [("webm", video), ("json", json.dumps(meta).encode()), ("nframes", pack_nframes(10))],
              SampleRecord(key=k, source=k, source_sha256="0" * 64, patient=k, split="test", frames=10))
    add_shard(m, w.finalize())
    write_manifest(d, m)


def test_feature_cache_follows_the_shards_content(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    _ingest(shards, 0, ["ds_a_1", "ds_b_1", "ds_c_1", "ds_d_1"])
    recipe = load_recipe(ROOT / "recipes/pretrain/echofm_tiny.yaml", SMALL + [f"data.shards={shards}"])
    torch.manual_seed(0)
    model = EchoFM(recipe.model, recipe.mask, recipe.loss)
    info = {"fingerprint": fingerprint(model)}
    kw = dict(cache_dir=tmp_path / "cache", features="tokens", grid=False, device=torch.device("cpu"), batch=2)

    first = features.cached_extract(model, info, recipe.data, "test", 1, **kw)
    assert len(first.metas) == 4
    _ingest(shards, 1, ["ds_e_1", "ds_f_1"])  # more data, same folder
    second = features.cached_extract(model, info, recipe.data, "test", 1, **kw)
    assert len(second.metas) == 6  # was 4: the cache was keyed by the path
    assert torch.equal(second.feats[:4], first.feats)

    # Same content: served from the cache (extract not called), also from a moved folder.
    monkeypatch.setattr(features, "extract", lambda *a, **k: pytest.fail("cache miss"))
    assert len(features.cached_extract(model, info, recipe.data, "test", 1, **kw).metas) == 6
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    again = features.cached_extract(model, info, dataclasses.replace(recipe.data, shards=str(moved)), "test", 1, **kw)
    assert torch.equal(again.feats, second.feats)
    # Another backbone or other stream settings: another key.
    keys = {features.cache_key(info, recipe.data, "test", 1, kw),
            features.cache_key({"fingerprint": "other"}, recipe.data, "test", 1, kw),
            features.cache_key(info, dataclasses.replace(recipe.data, stride=1), "test", 1, kw)}
    assert len(keys) == 3
