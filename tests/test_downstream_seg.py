"""Segmentation: masks stay aligned with the sampled frames through crop / resize / flip, and
the seg probe (light decoder on frozen token grids) runs, scores Dice and re-evaluates."""
import dataclasses
import json

import numpy as np
import torch

from echofm.engine.config import load_recipe
from echofm.engine.downstream.data import annotated_frames
from echofm.engine.downstream.run import evaluate, run
from echofm.loaders.stream import ClipStream, StreamConfig

SMALL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_num_heads=2", "model.decoder_depth=1"]


def _batches(cfg, n=2):
    s = ClipStream(cfg, train=True)
    out = []
    for b in s:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_masks_follow_flip_exactly(tiny_shards):
    """Same seed with and without flip: the flipped clips' masks are the flipped masks."""
    base = StreamConfig(shards=str(tiny_shards), split="train", num_frames=8, stride=2, size=112,
                        batch_size=4, segmentation=True, seed=5)
    plain = _batches(base)
    flipped = _batches(dataclasses.replace(base, flip=True))
    n_flipped = 0
    for a, b in zip(plain, flipped):
        assert torch.equal(a["frames_index"], b["frames_index"])
        for i in range(a["video"].shape[0]):
            if torch.equal(b["video"][i], a["video"][i]):
                assert torch.equal(b["seg"][i], a["seg"][i])
            else:
                assert torch.equal(b["video"][i], a["video"][i].flip(2))   # W axis of [T, H, W, C]
                assert torch.equal(b["seg"][i], a["seg"][i].flip(2))       # W axis of [T, H, W]
                n_flipped += 1
    assert n_flipped > 0


def test_masks_align_with_anatomy_through_crop_and_flip(tiny_shards):
    """The phantom's LV cavity is dark blood, its myocardium bright tissue: on every annotated
    frame of randomly cropped, resized and flipped clips the mask's myocardium is much brighter
    than its cavity; a mask shifted by 8 px loses most of that contrast."""
    cfg = StreamConfig(shards=str(tiny_shards), split="train", num_frames=8, stride=2, size=112,
                       batch_size=4, segmentation=True, random_resized_crop=(0.4, 1.0), flip=True, seed=2)
    aligned, shifted = [], []
    for b in _batches(cfg, 3):
        gray = b["video"].float().mean(-1)                                   # [B, T, H, W]
        for i in range(gray.shape[0]):
            valid = annotated_frames(b["meta"][i], b["frames_index"][i])
            for t in valid.nonzero().flatten().tolist():
                m, g = b["seg"][i, t], gray[i, t]
                if (m == 1).sum() < 20 or (m == 2).sum() < 20:
                    continue
                aligned.append(float(g[m == 2].mean() - g[m == 1].mean()))
                ms = torch.roll(m, 8, dims=1)
                shifted.append(float(g[ms == 2].mean() - g[ms == 1].mean()))
    assert len(aligned) >= 10
    assert min(aligned) > 20.0, aligned
    assert np.median(aligned) > np.median(shifted) + 20.0


def test_seg_probe_dice_overlay_and_evaluate(tiny_shards, tmp_path):
    r = load_recipe("recipes/downstream/synthetic_seg.yaml",
                    [f"data.shards={tiny_shards}", "downstream.backbone=random", f"downstream.out_dir={tmp_path}",
                     "downstream.bootstrap=20", "downstream.epochs=3", "downstream.hidden=16", *SMALL])
    res = run(r, log=lambda *_: None)
    run_dir = tmp_path / r.name
    test = res["metrics"]["test"]
    for k in ("dice_LV", "dice_LA", "dice_mean"):
        if test[k]["value"] is not None:
            assert 0.0 <= test[k]["ci_low"] <= test[k]["value"] <= test[k]["ci_high"] <= 1.0
    assert test["dice_LV"]["value"] is not None and test["frames"] > 0
    assert (run_dir / "test_seg.png").stat().st_size > 1000
    ev = evaluate(r, run_dir, log=lambda *_: None)
    assert ev["metrics"] == json.loads((run_dir / "results.json").read_text())["metrics"]
