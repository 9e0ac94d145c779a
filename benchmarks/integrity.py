"""What integrity costs: the stream's per-sample sha256 check and checkpoint hashing.

    python benchmarks/integrity.py [--shards-112 DIR] [--shards-224 DIR] [--videos 24]
                                   [--cache DIR] [--steps 5] [--out FILE]

1. Sample check (`data.verify`): the first time a process reads a sample, the stream hashes
   its members (video, json, .nframes) and compares 16 bytes of each sha256 with the one
   ingest recorded (later epochs pay nothing). Timed over
   every sample of VP9 shards at 112^2 and 224^2 (best of 3 passes over bytes already in
   memory, so the cost is the hashing, not the disk), as ms per sample, and as a share of
   one tiny-recipe training step (echofm_tiny, batch 4, 16 x 112^2, forward + backward +
   AdamW on the CPU, median of `--steps`).
2. Checkpoint hashing: `save` hashes every file of a checkpoint into meta.json and loading
   hashes them again (`verify`). Timed on the tiny model's DeepSpeed checkpoint (ZeRO-0,
   fp32: weights + AdamW moments), as seconds per checkpoint and MB/s.

Prints a table and writes integrity.json to a new run folder runs/bench/integrity-<timestamp>/,
or to --out (the committed numbers: --out benchmarks/results/integrity.json). Shards built
here are cached in ~/.cache/echofm/bench/integrity/ (`echofm bench --clean` removes them);
--shards-* folders are only read.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from echofm.engine import bench

ROOT = Path(__file__).resolve().parents[1]


def sample_check_ms(shards: Path) -> dict:
    """ms per sample to hash-check every member of every sample (best of 3 passes)."""
    from echofm.loaders.shards import read_index, read_manifest

    samples = []
    for s in read_manifest(shards)["shards"]:
        data = (shards / s["tar"]).read_bytes()
        samples += [[data[off:off + size] for _, off, size, _ in comps] for comps in read_index(shards / s["idx"])]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for members in samples:
            for b in members:
                hashlib.sha256(b).digest()[:16]
        best = min(best, time.perf_counter() - t0)
    nbytes = sum(len(b) for m in samples for b in m)
    return {"samples": len(samples), "kb_per_sample": round(nbytes / len(samples) / 1e3, 1),
            "ms_per_sample": round(1e3 * best / len(samples), 4), "mb_per_s": round(nbytes / best / 1e6, 0)}


def tiny_step_s(steps: int) -> float:
    """Median seconds of one echofm_tiny training step (batch 4, 16 x 112^2) on this CPU."""
    import torch

    from echofm.engine.config import load_recipe
    from echofm.engine.model import EchoFM

    r = load_recipe(ROOT / "recipes/pretrain/echofm_tiny.yaml")
    torch.manual_seed(0)
    model = EchoFM(r.model, r.mask, r.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    video = torch.randint(0, 255, (r.data.batch_size, 16, 112, 112, 3), dtype=torch.uint8)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(video)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step pays for allocations and lazy init
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def checkpoint_hashing() -> dict:
    """Save the tiny model's checkpoint; time hashing all its files (save) and `verify` (load)."""
    import torch

    from echofm.engine import checkpoint as ckpt
    from echofm.engine.config import load_recipe, to_dict
    from echofm.engine.model import EchoFM
    from echofm.engine.distributed import build_engine, init_distributed

    init_distributed()
    r = load_recipe(ROOT / "recipes/pretrain/echofm_tiny.yaml")
    engine, _, _ = build_engine(EchoFM(r.model, r.mask, r.loss), r, world_size=1)
    loss = engine(torch.randint(0, 255, (r.data.batch_size, 16, 112, 112, 3), dtype=torch.uint8))["loss"]
    engine.backward(loss)
    engine.step()  # AdamW moments exist: a full-size checkpoint
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = ckpt.save(engine, Path(d), 1, rank_state={"step": 1, "rng": ckpt.rng_state()},
                         recipe=to_dict(r), keep_last=1, rank=0, world_size=1)
        save_s = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        hash_s = min(_timed(lambda: ckpt._hash_files(path)) for _ in range(3))
        verify_s = min(_timed(lambda: ckpt.verify(path)) for _ in range(3))
    return {"checkpoint_mb": round(nbytes / 1e6, 1), "save_s_total": round(save_s, 3),
            "hash_s": round(hash_s, 3), "verify_s": round(verify_s, 3),
            "hash_mb_per_s": round(nbytes / hash_s / 1e6, 0)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards-112", type=Path, default=None)
    ap.add_argument("--shards-224", type=Path, default=None)
    ap.add_argument("--videos", type=int, default=24, help="synthetic videos when shards are built")
    ap.add_argument("--cache", type=Path, default=bench.cache_dir("integrity"))
    ap.add_argument("--steps", type=int, default=5, help="timed tiny-recipe steps")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: a new run folder)")
    args = ap.parse_args()

    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    res = {"machine": platform.processor() or platform.machine(), "samples": {}}
    step = tiny_step_s(args.steps)
    res["tiny_step_s"] = round(step, 4)
    for size, given in ((112, args.shards_112), (224, args.shards_224)):
        shards = given or cached_corpus(SynthConfig(videos=args.videos, seed=0, dicom_fraction=0.0),
                                        IngestConfig(size=size, codec="vp9", progress=False), args.cache,
                                        log=lambda m: print(m, flush=True))
        r = sample_check_ms(shards)
        r["share_of_tiny_step_pct"] = round(100 * r["ms_per_sample"] * 4 / (1e3 * step), 3)  # batch 4
        res["samples"][f"{size}"] = r
    res["checkpoint"] = checkpoint_hashing()

    print(f"{'sample check':<16}{'KB/sample':>10}{'ms/sample':>11}{'MB/s':>8}{'% of tiny step':>16}")
    for size, r in res["samples"].items():
        print(f"{size + '^2 VP9':<16}{r['kb_per_sample']:>10}{r['ms_per_sample']:>11}{r['mb_per_s']:>8.0f}"
              f"{r['share_of_tiny_step_pct']:>16}")
    c = res["checkpoint"]
    print(f"tiny step {res['tiny_step_s']:.3f} s (batch 4, CPU); tiny checkpoint {c['checkpoint_mb']} MB: "
          f"hashing at save {c['hash_s']} s, verify at load {c['verify_s']} s ({c['hash_mb_per_s']:.0f} MB/s), "
          f"whole save {c['save_s_total']} s")
    bench.write_json(bench.results_path("integrity", args.out, "integrity.json"), res)
    bench.announce_cache(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
