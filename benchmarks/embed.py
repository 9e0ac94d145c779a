"""`echofm embed` throughput: clips/s end to end, and what bounds it (decode or the model).

    python benchmarks/embed.py [--recipe recipes/pretrain/echofm_tiny.yaml] [--videos 48]
                               [--clips 2] [--batch 0] [--device auto] [--repeats 2] [--out FILE]

One synthetic corpus (`loaders.synth` -> VP9 shards at the recipe's frame size, cached in
~/.cache/echofm/bench/embed/), one random-init backbone of the recipe's model. Three rates,
each the best of `--repeats` runs (the machine may be shared):

- decode: the evaluation ClipStream alone (the clips `embed` reads, no model);
- model:  the backbone's forward (`backbone.embed`: clip + phase embeddings) on uint8
          clips already on the device, at `--batch` (bf16 autocast on CUDA, fp32 on CPU);
- embed:  `echofm embed` end to end (decode + forward + Parquet parts), 1 process.

embed / min(decode, model) near 1 means the run is bound by the slower of the two; on a
GPU the model rate should sit far above decode (the issue's bar: bound by decode). Prints a
table, writes embed.json to a new run folder runs/bench/embed-<timestamp>/ (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from echofm.engine import bench


def build_shards(size: int, videos: int) -> Path:
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    return cached_corpus(SynthConfig(videos=videos, seed=0, dicom_fraction=0.0, workers=2),
                         IngestConfig(size=max(size, 112), codec="vp9", progress=False, workers=2),
                         bench.cache_dir("embed"), log=lambda m: print(m, flush=True))


def decode_rate(stream_cfg, device) -> float:
    from echofm.loaders.stream import ClipStream

    s = ClipStream(stream_cfg, train=False, device=device)
    t0, n = time.perf_counter(), 0
    for b in s:
        n += b["video"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    s.close()
    return n / (time.perf_counter() - t0)


def model_rate(model, features: str, batch: int, device, iters: int = 6) -> float:
    from echofm.engine.downstream.backbone import embed

    c = model.cfg
    video = torch.randint(0, 256, (batch, c.num_frames, c.img_size, c.img_size, c.in_chans), dtype=torch.uint8,
                          device=device)
    model = model.to(device).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        embed(model, video, features)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            embed(model, video, features)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def embed_rate(cfg, recipe) -> float:
    from echofm.engine.embed import embed

    out = Path(tempfile.mkdtemp(prefix="echofm-bench-embed-"))
    try:
        res = embed(dataclasses.replace(cfg, out=str(out)), recipe, log=lambda *_: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return res["clips_per_s"]


def main() -> None:
    from echofm.engine.config import load_recipe
    from echofm.engine.downstream.backbone import load_backbone
    from echofm.engine.downstream.features import stream_config
    from echofm.engine.embed import EmbedConfig, embed_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/pretrain/echofm_tiny.yaml")
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="0: 64 on CUDA, 8 on CPU (embed's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="results JSON (default: a new run folder)")
    args = ap.parse_args()

    device = embed_device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    recipe = load_recipe(args.recipe)
    size = recipe.model.resolved().img_size
    shards = build_shards(size, args.videos)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, shards=str(shards)))
    model, _ = load_backbone("random", recipe)
    cfg = EmbedConfig(shards=str(shards), clips=args.clips, batch=batch, device=str(device), progress=False)
    stream = stream_config(dataclasses.replace(recipe.data, num_frames=model.cfg.num_frames, size=size), "all",
                           args.clips, batch=batch, seg=False)
    rates = {"decode": 0.0, "model": 0.0, "embed": 0.0}
    for _ in range(args.repeats):  # interleaved: each rate sees the same share of other users' load
        rates["decode"] = max(rates["decode"], decode_rate(stream, device))
        rates["model"] = max(rates["model"], model_rate(model, cfg.features, batch, device))
        rates["embed"] = max(rates["embed"], embed_rate(cfg, recipe))
    bound = min(rates["decode"], rates["model"])
    print(f"{'rate':<8} {'clips/s':>9}   ({recipe.model.resolved().preset}, {size}^2, {model.cfg.num_frames} frames, "
          f"batch {batch}, {device}, {'bf16' if device.type == 'cuda' else 'fp32'})")
    for k, v in rates.items():
        print(f"{k:<8} {v:9.1f}")
    print(f"embed / min(decode, model) = {rates['embed'] / bound:.2f}; bound by "
          f"{'decode' if rates['decode'] < rates['model'] else 'the model'}")
    results = {"rates_clips_per_s": {k: round(v, 2) for k, v in rates.items()},
               "bound_by": "decode" if rates["decode"] < rates["model"] else "model",
               "embed_over_bound": round(rates["embed"] / bound, 3),
               "setup": {"recipe": args.recipe, "preset": recipe.model.resolved().preset, "size": size,
                         "num_frames": model.cfg.num_frames, "videos": args.videos, "clips": args.clips,
                         "batch": batch, "device": str(device), "repeats": args.repeats,
                         "cpu": platform.processor() or platform.machine(),
                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    bench.write_json(bench.results_path("embed", args.out, "embed.json"), results, recipe)
    bench.announce_cache(bench.cache_dir("embed"))


if __name__ == "__main__":
    main()
