"""Ingest throughput on the synthetic corpus: clips/s, CPU per clip, per-stage times, PSNR.

    python benchmarks/ingest.py [--videos 40] [--sizes 112,224] [--codecs vp9] [--workers 1]
                                [--fold 2] [--cache DIR] [--out FILE]

Three variants of the same ingest, side by side in one run on the same clips:
- `today`: the code before issue 26 (luma through swscale, every encoded video decoded back
  to count its frames; emulated by swapping those two functions back in), all frames, GOP 8;
- `fast`: this code, all frames, GOP 8 (what the faster per-clip work alone buys);
- `folded`: this code with the training stride folded in (`fold_stride=--fold`, GOP 4:
  loaders/fold.py, docs/shards.md): every --fold-th frame is cropped, measured and encoded.
The bar compares CPU-ms per clip (process CPU time of the ingest, the figure other load on a
shared machine moves least) and the PSNR of the decoded shard frames against the frames the
encoder was given (the source after crop and resize, at the kept frames).

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
import contextlib
import csv
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from echofm.engine import bench

VARIANTS = ("today", "fast", "folded")


def _decode(data: bytes):
    """Encoded video bytes -> uint8 [F, H, W, 3] RGB (what the PSNR column compares)."""
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def variant_config(name: str, fold: int) -> dict:
    """IngestConfig fields of a variant (see the module docstring)."""
    return {"fold_stride": fold, "gop": 4} if name == "folded" else {"fold_stride": 1, "gop": 8}


@contextlib.contextmanager
def code_of(variant: str):
    """`today`: the per-clip work before issue 26 (decode_video and count_frames as they were)."""
    from echofm.loaders import video_io

    saved = video_io.decode_video, video_io.count_frames
    if variant == "today":
        video_io.decode_video, video_io.count_frames = _today_decode_video, _today_count_frames
    try:
        yield
    finally:
        video_io.decode_video, video_io.count_frames = saved


def _today_decode_video(path, short_side: int = 0):
    """loaders/video_io.decode_video before issue 26 (frame threads, luma and the colour check
    every 16th frame through swscale): the same work per frame, its error handling left out."""
    import av

    from echofm.loaders.errors import DataError
    from echofm.loaders.video_io import DecodeReport, FrameSink, is_grey

    def frame_array(frame, sink):
        n = len(sink.frames)
        if sink.grey and n % sink.check_every and n:
            return frame.to_ndarray(format="gray")
        rgb = frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="gray") if sink.grey and is_grey(rgb) else rgb

    sink, rep = FrameSink(short_side=short_side), DecodeReport()
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        rep.declared = int(st.frames or 0)
        rate = st.average_rate or st.guessed_rate or st.base_rate
        fps = float(rate) if rate else 0.0
        for packet in c.demux(st):
            for f in packet.decode():
                rep.frames += 1
                rep.corrupt += bool(f.is_corrupt)
                sink.add(frame_array(f, sink))
    if not sink.frames:
        raise DataError(f"{path}: video has no decodable frames")
    return sink.result(), fps, sink, rep


def _today_count_frames(data: bytes) -> int:
    """loaders/video_io.count_frames before issue 26: decode the encoded video back."""
    import io

    import av

    with av.open(io.BytesIO(data)) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (ingest workers), all threads."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def psnr(decoded, reference) -> float:
    """dB over all pixels of uint8 frames [F, H, W(, 3)] vs the same-shape reference."""
    import numpy as np

    mse = float(np.mean((decoded.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0 ** 2 / max(mse, 1e-10))


def stage_times(corpus: Path, size: int, codec: str, limit: int, variant: str, fold: int) -> dict:
    """CPU ms per clip spent in each ingest stage (single process, `limit` clips), and the PSNR of
    the encoded video decoded back vs the frames given to the encoder. CPU time (process_time),
    not wall time, so other load on a shared machine does not inflate it."""
    import numpy as np

    from echofm.loaders.cycles import estimate_cycle
    from echofm.loaders.fold import fold_frames
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.sector import crop_resize, detect_sector
    from echofm.loaders.sources import discover, load_clip
    from echofm.loaders.video_io import encode_video, to_gray

    v = variant_config(variant, fold)
    clips = discover(corpus).clips[:limit]
    t = dict.fromkeys(("decode", "fold", "sector", "crop_resize", "cycle", "encode", "count"), 0.0)
    frames, db, nbytes = 0, [], 0
    with code_of(variant):
        from echofm.loaders import video_io

        for c in clips:
            t0 = time.process_time()
            dec = load_clip(c, short_side=IngestConfig(size=size).keep_side)
            t1 = time.process_time()
            kept, _, _ = fold_frames(dec.frames, None, [], v["fold_stride"])
            t2 = time.process_time()
            s = detect_sector(kept)
            t3 = time.process_time()
            out = crop_resize(kept, s, size)
            t4 = time.process_time()
            estimate_cycle(out, (dec.fps or 30.0) / v["fold_stride"])
            t5 = time.process_time()
            data = encode_video(out, (dec.fps or 30.0) / v["fold_stride"], codec, gop=v["gop"])
            t6 = time.process_time()
            video_io.count_frames(data)
            t7 = time.process_time()
            for k, a, b in (("decode", t0, t1), ("fold", t1, t2), ("sector", t2, t3), ("crop_resize", t3, t4),
                            ("cycle", t4, t5), ("encode", t5, t6), ("count", t6, t7)):
                t[k] += b - a
            frames += len(out)
            nbytes += len(data)
            back = _decode(data)
            db.append(psnr(to_gray(back) if out.ndim == 3 else back, out))
    return {"clips": len(clips), "frames": frames, "ms_per_clip": {k: 1e3 * x / len(clips) for k, x in t.items()},
            "ms_per_frame": {k: 1e3 * x / frames for k, x in t.items()},
            "cpu_ms_per_clip": 1e3 * sum(t.values()) / len(clips), "psnr_db": float(np.mean(db)),
            "kb_per_clip": nbytes / len(clips) / 1024}


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
            p, f = int(row["period"]), meta.get("stride_folded", 1)  # shard frame i = source frame i * f
            if meta["frames"] * f >= 2 * p:  # within 1 frame of the shard video (f source frames)
                n += 1
                hits += meta["period"] is not None and abs(meta["period"] * f - p) <= f
                nulls += meta["period"] is None
            for k in ("ed", "es"):  # cyclic distance (source frames) of each candidate to the nearest true frame
                true = [int(x) for x in row[k].split(";") if x]
                for t in [x * f for x in meta[k]] if true else []:
                    err[k] += [min(min(abs(t - u) % p, p - abs(t - u) % p) for u in true)]
    return {"clips_two_beats": n, "within_1_frame": hits, "fraction": hits / max(n, 1), "null": nulls,
            "ed_mean_abs_frames": sum(err["ed"]) / max(len(err["ed"]), 1),
            "es_mean_abs_frames": sum(err["es"]) / max(len(err["es"]), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--sizes", default="112,224")
    ap.add_argument("--codecs", default="vp9")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--fold", type=int, default=2, help="stride folded into the `folded` variant (the presets': 2)")
    ap.add_argument("--stage-clips", type=int, default=12, help="clips of the per-stage breakdown and PSNR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=bench.cache_dir("ingest"),
                    help="where the synthetic corpus is kept (rebuilt when its settings or code change)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: a new run folder)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # size < 128 warning

    from echofm.loaders.corpus import cached_synth
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.shard_verify import verify
    from echofm.loaders.synth import SynthConfig

    sizes, codecs = list(map(int, args.sizes.split(","))), args.codecs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="echofm_ingest_bench_"))
    try:
        t0 = time.perf_counter()
        corpus = cached_synth(SynthConfig(videos=args.videos, seed=args.seed, min_size=160, max_size=320,
                                          min_frames=40, max_frames=120, workers=2), args.cache)
        in_bytes = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file() and p.parent.name == "videos")
        print(f"corpus: {args.videos} videos, {in_bytes / 2**20:.1f} MB, ready in {time.perf_counter() - t0:.1f}s")
        # warm numba's cache and imports so the first configuration is not charged for them
        ingest([corpus], tmp / "warm", IngestConfig(size=112, progress=False))
        runs, verify_s, accuracy = [], None, {}
        for size in sizes:
            for codec in codecs:
                for workers in map(int, args.workers.split(",")):
                    for variant in VARIANTS:  # side by side: the machine's load moves all of them alike
                        out = tmp / f"s{size}_{codec}_w{workers}_{variant}"
                        cfg = IngestConfig(size=size, codec=codec, workers=workers, progress=False,
                                           **variant_config(variant, args.fold))
                        with code_of(variant):
                            c0 = _cpu()
                            r = ingest([corpus], out, cfg)
                            cpu = _cpu() - c0
                        runs.append({"size": size, "codec": codec, "workers": workers, "variant": variant,
                                     "fold_stride": cfg.fold_stride, "gop": cfg.gop, "clips": r.added,
                                     "rejected": r.rejected, "seconds": r.seconds, "clips_per_s": r.clips_per_s,
                                     "cpu_s": cpu, "cpu_ms_per_clip": 1e3 * cpu / max(r.added, 1),
                                     "clips_per_cpu_s": r.added / max(cpu, 1e-9),
                                     "input_mb_per_s": r.input_mb_per_s, "frames_per_s": r.frames / r.seconds,
                                     "output_mb": r.output_bytes / 2**20})
                        if variant not in accuracy:
                            accuracy[variant] = period_accuracy(corpus, out)
                        if verify_s is None:
                            t0 = time.perf_counter()
                            rep = verify(out)
                            verify_s = {"seconds": time.perf_counter() - t0, "ok": rep.ok, "samples": rep.samples,
                                        "frames": rep.frames, "size": size, "codec": codec}
                        shutil.rmtree(out, ignore_errors=True)
        stages = {size: {v: stage_times(corpus, size, codecs[0], args.stage_clips, v, args.fold) for v in VARIANTS}
                  for size in sizes}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bar = report(runs, stages, accuracy, verify_s)
    result = {"corpus": {"videos": args.videos, "seed": args.seed, "input_mb": in_bytes / 2**20},
              "machine": {"cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
                          "python": sys.version.split()[0]},
              "variants": {v: variant_config(v, args.fold) for v in VARIANTS},
              "runs": runs, "stages": stages, "bar": bar, "period_accuracy": accuracy, "verify": verify_s}
    bench.write_json(bench.results_path("ingest", args.out, "ingest.json"), result)
    bench.announce_cache(args.cache)
    return 0


def report(runs: list[dict], stages: dict, accuracy: dict, verify_s: dict) -> dict:
    """Print the tables; -> the bar: per size, clips per CPU-second and PSNR, folded vs today."""
    print(f"\n{'size':>5} {'codec':>6} {'workers':>7} {'variant':>7} {'clips':>6} {'s':>6} {'clips/s':>8} "
          f"{'CPU-ms/clip':>12} {'clips/CPU-s':>12} {'frames/s':>9} {'out MB':>7}")
    for r in runs:
        print(f"{r['size']:>5} {r['codec']:>6} {r['workers']:>7} {r['variant']:>7} {r['clips']:>6} {r['seconds']:>6.1f} "
              f"{r['clips_per_s']:>8.2f} {r['cpu_ms_per_clip']:>12.1f} {r['clips_per_cpu_s']:>12.2f} "
              f"{r['frames_per_s']:>9.0f} {r['output_mb']:>7.1f}")
    print("\nstage CPU ms per clip (1 process), PSNR of the decoded shard frames vs the encoder's input:")
    for size, per in stages.items():
        for v, st in per.items():
            print(f"  {size:>3} {v:>7}: " + "  ".join(f"{k} {x:.0f}" for k, x in st["ms_per_clip"].items())
                  + f"  = {st['cpu_ms_per_clip']:.0f} ms ({st['frames'] / st['clips']:.0f} frames/clip, "
                  f"{st['kb_per_clip']:.0f} KB)  PSNR {st['psnr_db']:.2f} dB")
    bar = {}
    for size, per in stages.items():
        rate = {v: [r["clips_per_cpu_s"] for r in runs if r["size"] == size and r["variant"] == v and r["workers"] == 1]
                for v in VARIANTS}
        if rate["today"] and rate["folded"]:
            bar[size] = {"clips_per_cpu_s_ratio": round(rate["folded"][0] / rate["today"][0], 2),
                         "clips_per_cpu_s_ratio_unfolded": round(rate["fast"][0] / rate["today"][0], 2),
                         "psnr_delta_db": round(per["folded"]["psnr_db"] - per["today"]["psnr_db"], 2)}
            bar[size]["ok"] = bar[size]["clips_per_cpu_s_ratio"] >= 2 and abs(bar[size]["psnr_delta_db"]) <= 0.5
            print(f"  {size}^2 folded vs today: {bar[size]['clips_per_cpu_s_ratio']:.2f}x clips per CPU-second "
                  f"(unfolded: {bar[size]['clips_per_cpu_s_ratio_unfolded']:.2f}x), PSNR "
                  f"{bar[size]['psnr_delta_db']:+.2f} dB; bar (>= 2x, within 0.5 dB): {bar[size]['ok']}")
    for v, a in accuracy.items():
        print(f"period ({v}) within 1 shard frame: {a['within_1_frame']}/{a['clips_two_beats']} clips spanning >= 2 "
              f"beats ({100 * a['fraction']:.0f}%), {a['null']} null; ED/ES candidates "
              f"{a['ed_mean_abs_frames']:.1f} / {a['es_mean_abs_frames']:.1f} source frames from the truth")
    print(f"shards verify (DALI CPU decode of every video): {verify_s['seconds']:.1f}s for {verify_s['samples']} "
          f"samples / {verify_s['frames']} frames at {verify_s['size']}, ok={verify_s['ok']}")
    return bar


if __name__ == "__main__":
    sys.exit(main())
