"""Ingest throughput on the synthetic corpus: clips/s, input MB/s, frames/s, per-stage times.

    python benchmarks/ingest.py [--videos 40] [--sizes 112,224] [--codecs vp9] [--workers 1,2]
                                [--cache DIR] [--out FILE]

Builds a synthetic corpus (loaders/synth: H.264 mp4, MJPEG avi, DICOM; 160-320 px; cached by
its settings and code, loaders/corpus.py), then
runs `ingest` end to end once per (size, codec, workers) into a fresh directory and
reports clips/s, input MB/s (source bytes read), output frames/s and MB written. A stage
breakdown (one process, same clips, CPU time) shows where a clip's time goes: decode,
sector, crop+resize, cycle, encode, decode-back count. Wall-clock rates depend on what else
runs on the machine: the JSON records the load average. Also the period accuracy on the corpus
(clips spanning >= 2 beats, within 1 frame), and `shards verify` time for one result.

Writes ingest.json to a new run folder runs/bench/ingest-<timestamp>/, or to --out (the
committed numbers: --out benchmarks/results/ingest.json). The corpus is cached in
~/.cache/echofm/bench/ingest/ (its size is printed; `echofm bench --clean` removes it); the
ingested shards go to a temporary folder that is removed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from echofm.engine import bench


def stage_times(corpus: Path, size: int, codec: str, limit: int) -> dict:
    """CPU ms per clip spent in each ingest stage (single process, `limit` clips). CPU time
    (process_time), not wall time, so other load on a shared machine does not inflate it."""
    from echofm.loaders.cycles import estimate_cycle
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.sector import crop_resize, detect_sector
    from echofm.loaders.sources import discover, load_clip
    from echofm.loaders.video_io import count_frames, encode_video

    clips = discover(corpus).clips[:limit]
    t = dict.fromkeys(("decode", "sector", "crop_resize", "cycle", "encode", "count"), 0.0)
    frames = 0
    for c in clips:
        t0 = time.process_time()
        dec = load_clip(c, short_side=IngestConfig(size=size).keep_side)
        t1 = time.process_time()
        s = detect_sector(dec.frames)
        t2 = time.process_time()
        out = crop_resize(dec.frames, s, size)
        t3 = time.process_time()
        estimate_cycle(out, dec.fps)
        t4 = time.process_time()
        data = encode_video(out, dec.fps or 30.0, codec)
        t5 = time.process_time()
        count_frames(data)
        t6 = time.process_time()
        for k, a, b in (("decode", t0, t1), ("sector", t1, t2), ("crop_resize", t2, t3), ("cycle", t3, t4),
                        ("encode", t4, t5), ("count", t5, t6)):
            t[k] += b - a
        frames += len(out)
    return {"clips": len(clips), "frames": frames, "ms_per_clip": {k: 1e3 * v / len(clips) for k, v in t.items()},
            "ms_per_frame": {k: 1e3 * v / frames for k, v in t.items()}}


def period_accuracy(corpus: Path, shard_dir: Path) -> dict:
    from echofm.loaders import ids
    from echofm.loaders.shards import iter_tar_samples, read_manifest

    key, _ = ids.load_key(ids.default_key_path(shard_dir), create=False)
    rows = {ids.path_hash(key, r["file"]): r for r in csv.DictReader(open(corpus / "labels.csv"))}
    hits = n = nulls = 0
    err = {"ed": [], "es": []}
    for s in read_manifest(shard_dir)["shards"]:
        for _, comp in iter_tar_samples(shard_dir / s["tar"]):
            meta = json.loads(comp["json"])
            row = rows[meta["source"]]
            p = int(row["period"])
            if meta["frames"] >= 2 * p:
                n += 1
                hits += meta["period"] is not None and abs(meta["period"] - p) <= 1
                nulls += meta["period"] is None
            for k in ("ed", "es"):  # cyclic distance of each candidate to the nearest true frame
                true = [int(x) for x in row[k].split(";") if x]
                for t in meta[k] if true else []:
                    err[k] += [min(min(abs(t - u) % p, p - abs(t - u) % p) for u in true)]
    return {"clips_two_beats": n, "within_1_frame": hits, "fraction": hits / max(n, 1), "null": nulls,
            "ed_mean_abs_frames": sum(err["ed"]) / max(len(err["ed"]), 1),
            "es_mean_abs_frames": sum(err["es"]) / max(len(err["es"]), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--sizes", default="112,224")
    ap.add_argument("--codecs", default="vp9")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=bench.cache_dir("ingest"),
                    help="where the synthetic corpus is kept (rebuilt when its settings or code change)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: a new run folder)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # size < 128 warning

    from echofm.loaders.corpus import cached_synth
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.shards import verify
    from echofm.loaders.synth import SynthConfig

    tmp = Path(tempfile.mkdtemp(prefix="echofm_ingest_bench_"))
    try:
        t0 = time.perf_counter()
        corpus = cached_synth(SynthConfig(videos=args.videos, seed=args.seed, min_size=160, max_size=320,
                                          min_frames=40, max_frames=120, workers=2), args.cache)
        in_bytes = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file() and p.parent.name == "videos")
        print(f"corpus: {args.videos} videos, {in_bytes / 2**20:.1f} MB, ready in {time.perf_counter() - t0:.1f}s")
        # warm numba's cache and imports so the first configuration is not charged for them
        ingest([corpus], tmp / "warm", IngestConfig(size=112, progress=False))
        runs, verify_s, accuracy = [], None, None
        for size in map(int, args.sizes.split(",")):
            for codec in args.codecs.split(","):
                for workers in map(int, args.workers.split(",")):
                    out = tmp / f"s{size}_{codec}_w{workers}"
                    r = ingest([corpus], out, IngestConfig(size=size, codec=codec, workers=workers, progress=False))
                    runs.append({"size": size, "codec": codec, "workers": workers, "clips": r.added,
                                 "rejected": r.rejected, "seconds": r.seconds, "clips_per_s": r.clips_per_s,
                                 "input_mb_per_s": r.input_mb_per_s, "frames_per_s": r.frames / r.seconds,
                                 "output_mb": r.output_bytes / 2**20})
                    if accuracy is None:
                        accuracy = period_accuracy(corpus, out)
                    if verify_s is None:
                        t0 = time.perf_counter()
                        rep = verify(out)
                        verify_s = {"seconds": time.perf_counter() - t0, "ok": rep.ok, "samples": rep.samples,
                                    "frames": rep.frames, "size": size, "codec": codec}
        stages = {size: stage_times(corpus, size, args.codecs.split(",")[0], limit=12)
                  for size in map(int, args.sizes.split(","))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'size':>5} {'codec':>6} {'workers':>7} {'clips':>6} {'s':>7} {'clips/s':>8} {'in MB/s':>8} "
          f"{'frames/s':>9} {'out MB':>7}")
    for r in runs:
        print(f"{r['size']:>5} {r['codec']:>6} {r['workers']:>7} {r['clips']:>6} {r['seconds']:>7.1f} "
              f"{r['clips_per_s']:>8.2f} {r['input_mb_per_s']:>8.2f} {r['frames_per_s']:>9.0f} {r['output_mb']:>7.1f}")
    print("\nstage CPU ms per clip (1 process): " + ", ".join(stages[next(iter(stages))]["ms_per_clip"]))
    for size, st in stages.items():
        print(f"  size {size}: " + "  ".join(f"{k} {v:.0f}" for k, v in st["ms_per_clip"].items())
              + f"  ({st['frames'] / st['clips']:.0f} frames/clip)")
    print(f"\nperiod within 1 frame: {accuracy['within_1_frame']}/{accuracy['clips_two_beats']} clips spanning "
          f">= 2 beats ({100 * accuracy['fraction']:.0f}%), {accuracy['null']} null; ED/ES candidates "
          f"{accuracy['ed_mean_abs_frames']:.1f} / {accuracy['es_mean_abs_frames']:.1f} frames from the truth")
    print(f"shards verify (DALI CPU decode of every video): {verify_s['seconds']:.1f}s for {verify_s['samples']} "
          f"samples / {verify_s['frames']} frames at {verify_s['size']}, ok={verify_s['ok']}")
    result = {"corpus": {"videos": args.videos, "seed": args.seed, "input_mb": in_bytes / 2**20},
              "machine": {"cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
                          "python": sys.version.split()[0]},
              "runs": runs, "stages": stages, "period_accuracy": accuracy, "verify": verify_s}
    bench.write_json(bench.results_path("ingest", args.out, "ingest.json"), result)
    bench.announce_cache(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
