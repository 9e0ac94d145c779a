"""Loader benchmark: our ClipStream vs the official-EchoFM-style loader vs a fair PyAV loader.

    python benchmarks/loader.py [--shards-112 DIR] [--shards-224 DIR] [--videos 48] [--clips 192]
                                [--threads 2] [--repeats 3] [--cache DIR] [--out FILE]
    python benchmarks/loader.py --remote [--remote-videos 96] [--shard-kb 256] [--clips 80] [--out FILE]

Same corpus, same clip spec, same CPU threads for every loader:
- corpus: `loaders.synth` phantoms ingested by `loaders.ingest` (VP9, GOP 8) at 112^2 and at
  224^2 (cached; or pass --shards-*, which are only read), and the same phantoms ingested
  with the stride folded in (fold_stride 2, GOP 4: loaders/fold.py; docs/shards.md). The
  baselines read the SAME encoded videos: the shards' `.webm` components, extracted once to
  files in the cache (keyed by the shards' manifest).
- clip: 16 frames at stride 2 (span 31), output size = the corpus size, batch 8, random
  start (the official-style loader takes the first frames, as the official code does).
- threads: data.num_threads = N (DALI's threads, and N host decode threads); each baseline
  is a torch DataLoader with N worker processes, every worker single-threaded (cv2 / torch /
  FFmpeg thread_count = 1).

Loaders:
  (a) ours   ClipStream, CPU backend as it ships (data.cpu_decoder: host), on the folded shards
             (stride 2 = shard stride 1): libavcodec on the stream's threads decodes the
             clip's GOPs straight from the WebM's frame table, grey frames kept as luma
             (loaders/host_decode.py), DALI resize, uint8 [B, T, H, W, 3] batches.
             ours-unfolded: the same on the unfolded shards. dali: ClipStream with
             data.cpu_decoder: dali (DALI's CPU decoder, RGB, the video cut to the clip's
             GOPs: loaders/trim.py) on the folded shards.
  (b) official  decode the whole video with PyAV, resize every frame with PIL (bilinear),
             then take the first 16 frames at stride 2 (wrapping on short videos).
  (c) pyav   seek to the keyframe before a random start, decode only up to the last
             needed frame, keep the 16 needed frames, resize them with cv2 (INTER_AREA).
             pyav-folded: the same on the folded videos at stride 1 (what the format alone
             gives a plain loader). The bar compares ours with official and pyav.

Reported per loader and size: clips/s, sampled fps (clips/s x 16, what the model gets) and
decoded fps (frames the decoder produced per second, counted from the first frame of the
stream each decoder was given; decoded / sampled is the decode waste). Each loader runs `--repeats` times interleaved (the machine
may be shared) and the best run counts. The CPU time the loader's processes (main +
workers, all threads) used in the timed window is read from /proc: CPU-ms per clip is the
load-independent cost, since wall-clock rates move with other users' load. Prints a table
with ratios to the official-style loader, writes loader.json and loader.png to a new run
folder runs/bench/loader-<timestamp>/ (or to --out: the committed numbers are
--out benchmarks/results/loader.json). The cache (~/.cache/echofm/bench/loader/: corpora,
shards, extracted videos) is announced with its size; `echofm bench --clean` removes it.
`--remote` instead reads the same shards from local disk and from an S3 server on localhost
(moto, its own process): cold cache, warm cache and a cache bounded below the corpus, with
the peak cache bytes against the limit (docs/data.md; committed as
--out benchmarks/results/loader_remote.json).
With CUDA it also runs the mixed (NVDEC)
backend at 224^2 and compares clips/s with a ViT-B step's need (docs/mfu.md: ~1,500 clips/s).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from echofm.engine import bench

T, STRIDE, BATCH = 16, 2, 8
VITB_NEED_CLIPS_S = 1500.0  # docs/mfu.md: ViT-B video MAE at 40% MFU on one H200


# ---------------------------------------------------------------- corpus


def build_corpus(cache: Path, size: int, videos: int, fold: int = 1) -> Path:
    """Synthetic corpus -> VP9 shards at `size` (cached by content: loaders/corpus.py) -> shard dir.
    fold > 1: the stride folded in (every fold-th frame, GOP 4: loaders/fold.py)."""
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    folded = {"fold_stride": fold, "gop": 4} if fold > 1 else {}
    return cached_corpus(SynthConfig(videos=videos, seed=0, dicom_fraction=0.0, workers=2),
                         IngestConfig(size=size, codec="vp9", progress=False, workers=2, **folded), cache,
                         log=lambda m: print(m, flush=True))


def extract_videos(shards: Path, cache: Path) -> list[tuple[str, int]]:
    """Every split's video components as files (same bitstreams) -> [(path, nframes)].

    The files go to `cache/extracted/<manifest sha256>/`, never into the shard folder (a
    user's --shards-* are only read)."""
    from echofm.loaders.shards import manifest_sha256, read_index, read_manifest

    m = read_manifest(shards)
    vdir = cache / "extracted" / manifest_sha256(shards)[:16]
    vdir.mkdir(parents=True, exist_ok=True)
    out = []
    for s in m["shards"]:
        tar = (shards / s["tar"]).read_bytes()
        for comps in read_index(shards / s["idx"]):
            c = {ext: (off, size, name) for ext, off, size, name in comps}
            off, size, name = c[m["video_ext"]]
            path = vdir / name
            if not path.exists():
                path.write_bytes(tar[off:off + size])
            noff, nsize, _ = c["nframes"]
            out.append((str(path), int(np.frombuffer(tar[noff:noff + nsize], "<i4")[0])))
    return out


# ---------------------------------------------------------------- baselines


def _single_thread_worker(_: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class OfficialStyle:
    """Decode the whole video, PIL-resize every frame, take the first T frames at stride."""

    def __init__(self, videos, size):
        self.videos, self.size = videos, size

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        import av
        import torch
        from PIL import Image

        path, _ = self.videos[i]
        with av.open(path) as c:
            st = c.streams.video[0]
            st.codec_context.thread_count = 1
            frames = [Image.fromarray(f.to_ndarray(format="rgb24")).resize((self.size, self.size),
                                                                           Image.BILINEAR)
                      for f in c.decode(st)]
        clip = np.stack([np.asarray(frames[(t * STRIDE) % len(frames)]) for t in range(T)])
        return torch.from_numpy(clip), len(frames)


class FairPyAV:
    """Seek to the keyframe before a random start, decode only what the clip needs, cv2 resize."""

    def __init__(self, videos, size, seed=0, stride=STRIDE):
        self.videos, self.size, self.seed, self.stride = videos, size, seed, stride
        self.calls = 0

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        import av
        import cv2
        import torch

        path, n = self.videos[i]
        self.calls += 1
        rng = np.random.default_rng([self.seed, i, self.calls])
        start = int(rng.integers(0, max(n - ((T - 1) * self.stride + 1) + 1, 1)))
        want = [(start + t * self.stride) % n for t in range(T)]
        need = set(want)
        got: dict[int, np.ndarray] = {}
        decoded = 0
        with av.open(path) as c:
            st = c.streams.video[0]
            st.codec_context.thread_count = 1
            fps = float(st.average_rate)
            first = min(want) if max(want) - min(want) == (T - 1) * self.stride else 0  # wrapped: from 0
            if first > 0:  # lands on the keyframe at or before `first`
                c.seek(int(first / fps / st.time_base), stream=st, backward=True, any_frame=False)
            for f in c.decode(st):
                decoded += 1
                k = int(round(float(f.pts * st.time_base) * fps))
                if k in need:
                    got[k] = cv2.resize(f.to_ndarray(format="rgb24"), (self.size, self.size),
                                        interpolation=cv2.INTER_AREA)
                if k >= max(want):
                    break
        clip = np.stack([got[k] for k in want])
        return torch.from_numpy(clip), decoded


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes (all their threads) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def run_torch_loader(dataset, workers: int, clips: int, warm: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    dl = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                    worker_init_fn=_single_thread_worker, persistent_workers=True,
                    generator=torch.Generator().manual_seed(0))
    n = decoded = 0
    t0 = c0 = None
    it = iter(dl)
    pids = [os.getpid()] + [w.pid for w in it._workers]
    seen = 0
    while n < clips:
        try:
            video, dec = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        seen += 1
        if seen == warm:  # worker start-up and first batches excluded
            t0, c0 = time.perf_counter(), _cpu_seconds(pids)
            continue
        if t0 is None:
            continue
        n += video.shape[0]
        decoded += int(dec.sum())
    dt, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
    del it, dl
    return _rates(n, decoded, dt, cpu)


def run_clipstream(shards: Path, size: int, threads: int, clips: int, warm: int, backend: str = "cpu",
             device: str = "cpu", cut: bool = True, decoder: str = "host") -> dict:
    import torch

    from echofm.loaders.stream import ClipStream, StreamConfig

    cfg = StreamConfig(shards=str(shards), split="all", num_frames=T, stride=STRIDE, size=size,
                       batch_size=BATCH, num_threads=threads, backend=backend, cut_gops=cut, cpu_decoder=decoder)
    s = ClipStream(cfg, train=True, device=torch.device(device))
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    n, decoded, dt, cpu, _ = _time_stream(s, clips, warm, sync)
    s.close()  # DALI's threads stop before the next loader forks its workers
    return _rates(n, decoded, dt, cpu)


def _time_stream(s, clips: int, warm: int, sync=lambda: None, t_start: float | None = None):
    """Iterate a ClipStream (epochs on end) and time it from batch `warm` on, over `clips` clips
    -> (clips, decoded frames, wall s, CPU s, s from t_start to the first batch)."""
    seen = n = base_dec = 0
    t0 = c0 = first = None
    while n < clips:
        for b in s:
            seen += 1
            if first is None and t_start is not None:
                first = time.perf_counter() - t_start
            if seen == warm:
                sync()
                t0, base_dec, c0 = time.perf_counter(), s.stats["decoded_frames"], _cpu_seconds([os.getpid()])
                continue
            if t0 is None:
                continue
            n += b["video"].shape[0]
            if n >= clips:
                break
    sync()
    dt, cpu = time.perf_counter() - t0, _cpu_seconds([os.getpid()]) - c0
    return n, s.stats["decoded_frames"] - base_dec, dt, cpu, first


def _rates(n: int, decoded: int, dt: float, cpu: float) -> dict:
    """Wall-clock rates plus the CPU the loader's processes used in the same window: on a shared
    machine `sampled_fps_per_core` (sampled frames per CPU-second) is the load-independent one."""
    return {"clips": n, "seconds": round(dt, 3), "clips_s": round(n / dt, 2),
            "sampled_fps": round(n * T / dt, 1), "decoded_fps": round(decoded / dt, 1),
            "cpu_cores_used": round(cpu / dt, 2), "cpu_ms_per_clip": round(cpu / max(n, 1) * 1e3, 2),
            "sampled_fps_per_core": round(n * T / max(cpu, 1e-9), 1)}


# ---------------------------------------------------------------- remote shards (s3://)


def _moto_server(port: int):
    """moto's S3 server as its own process (as a real store is): -> Popen."""
    import subprocess
    import urllib.request

    p = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                          "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError("moto server did not start")


def run_stream(shards: str, size: int, threads: int, clips: int, warm: int = 2, **kw) -> tuple[dict, dict]:
    """The same protocol for local and remote shards -> (rates, cache stats): `startup_s` (stream
    construction: client, manifest, index files) and `first_batch_s` are reported apart; the
    rates are timed from batch `warm` on, over `clips` clips (as the loaders above)."""
    import torch

    from echofm.loaders.stream import ClipStream, StreamConfig

    cfg = StreamConfig(shards=shards, split="all", num_frames=T, stride=STRIDE, size=size, batch_size=BATCH,
                       num_threads=threads, backend="cpu", **kw)
    t_start = time.perf_counter()
    s = ClipStream(cfg, train=True, device=torch.device("cpu"))
    startup = time.perf_counter() - t_start
    n, decoded, dt, cpu, first = _time_stream(s, clips, warm, t_start=t_start)
    remote = s.samples.remote
    cache = {} if remote is None else {
        "downloads": remote.cache.downloads, "downloaded_bytes": remote.cache.downloaded_bytes,
        "peak_bytes": remote.cache.peak_bytes, "limit_bytes": remote.cache.limit,
        "end_bytes": remote.cache.used_bytes()}
    rates = _rates(n, decoded, dt, cpu)
    s.close()
    return {**rates, "startup_s": round(startup, 3), "first_batch_s": round(first, 3)}, cache


def remote_main(args) -> int:
    """--remote: the same shards from local disk and from a local S3 server (cold and warm
    cache; a cache bounded below the corpus) side by side, best of --repeats, interleaved."""
    import shutil
    import tempfile

    from echofm.loaders.remote import push
    from echofm.loaders.shards import read_manifest

    shards = args.shards_112 or build_sharded(args.cache, args.remote_videos, args.shard_kb)
    m = read_manifest(shards)
    total, biggest = sum(e["bytes"] for e in m["shards"]), max(e["bytes"] for e in m["shards"])
    port = bench_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    server = _moto_server(port)
    work = Path(tempfile.mkdtemp(prefix="echofm-remote-"))
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        push(shards, "s3://bench/loader", log=lambda _m: None)
        tight = dict(fetch_threads=2, fetch_ahead=1, prefetch=1)  # in use at once: 2 + 3 x 8 shards
        bounded_gb = (2 + 3 * BATCH) * biggest / 1e9
        bandwidth = max(store_bandwidth("bench", "loader/", m) for _ in range(args.repeats))
        runs = {"local": [], "s3_cold": [], "s3_warm": [], "s3_bounded": []}
        run_stream(str(shards), 112, args.threads, args.clips)  # untimed: imports, DALI's first start, page cache
        for r in range(args.repeats):  # interleaved: the machine's load moves all of them alike
            cold = work / f"cold{r}"
            runs["local"].append(run_stream(str(shards), 112, args.threads, args.clips))
            runs["s3_cold"].append(run_stream("s3://bench/loader", 112, args.threads, args.clips, cache_dir=str(cold)))
            runs["s3_warm"].append(run_stream("s3://bench/loader", 112, args.threads, args.clips, cache_dir=str(cold)))
            runs["s3_bounded"].append(run_stream("s3://bench/loader", 112, args.threads, args.clips,
                                                 cache_dir=str(work / f"b{r}"), cache_limit_gb=bounded_gb, **tight))
            for k, v in runs.items():
                print(f"  run {r} {k:10s} {v[-1][0]['sampled_fps']:8.1f} sampled fps  {v[-1][1]}", flush=True)
            shutil.rmtree(cold)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v, key=lambda x: x[0]["sampled_fps"]) for k, v in runs.items()}
    res = {"shards": len(m["shards"]), "corpus_bytes": total, "largest_shard_bytes": biggest,
           "clips_timed": args.clips, "threads": args.threads, "best_of": args.repeats, "host": platform.node(),
           "protocol": "rates timed from the 3rd batch over the clips (the loaders' protocol); stream "
                       "construction (startup_s) and the first batch (first_batch_s) reported apart; the cold "
                       "window lies within the first epoch (clips + 2 batches <= videos): the cache fills while "
                       "timed; moto S3 server in its own process on localhost, on the same CPUs",
           "loaders": {k: {**b[0], "cache": b[1], "runs": [x[0]["sampled_fps"] for x in runs[k]],
                           "peak_bytes_runs": [x[1].get("peak_bytes") for x in runs[k]]} for k, b in best.items()}}
    loc = best["local"][0]["sampled_fps"]
    need = loc / T * total / len(m["shards"]) / 1e6  # MB/s a cold epoch needs at the local clip rate
    res["store_MB_s"] = round(bandwidth, 1)
    res["cold_bound"] = {"needed_MB_s_at_local_rate": round(need, 1),
                         "max_cold_ratio": round(min(1.0, bandwidth / need), 3),
                         "note": "a cold epoch reads each clip's shard once (here ~1 clip per shard): its rate "
                                 "is at most the store's bandwidth / bytes per clip"}
    for k in runs:
        res["loaders"][k]["ratio_vs_local"] = round(best[k][0]["sampled_fps"] / loc, 3)
    peaks = [x[1]["peak_bytes"] <= x[1]["limit_bytes"] for k in runs if k != "local" for x in runs[k]]
    res["cache_within_limit"] = all(peaks)
    res["bar"] = {"warm_ge_0.95": res["loaders"]["s3_warm"]["ratio_vs_local"] >= 0.95,
                  "cold_ge_0.7": res["loaders"]["s3_cold"]["ratio_vs_local"] >= 0.7}
    print(f"\nRemote shards ({len(m['shards'])} shards, {total / 1e6:.1f} MB; {args.clips} clips timed after 2 "
          f"batches, best of {args.repeats}; CPU-ms/clip: the leanest run, load-independent):")
    print(f"{'source':12} {'sampled fps':>12} {'x local':>8} {'startup s':>10} {'1st batch s':>12} "
          f"{'downloads':>10} {'peak cache MB':>14} {'limit MB':>9} {'CPU-ms/clip':>12}")
    for k, v in res["loaders"].items():
        c = v["cache"]
        print(f"{k:12} {v['sampled_fps']:12.1f} {v['ratio_vs_local']:8.3f} {v['startup_s']:10.3f} "
              f"{v['first_batch_s']:12.3f} {c.get('downloads', '-'):>10} "
              f"{c.get('peak_bytes', 0) / 1e6:14.2f} {c.get('limit_bytes', 0) / 1e6:9.1f} "
              f"{min(x[0]['cpu_ms_per_clip'] for x in runs[k]):12.2f}")
    print(f"cache within its limit in every run: {res['cache_within_limit']}; bar: {res['bar']}")
    print(f"store bandwidth (8 parallel GETs, best): {bandwidth:.0f} MB/s; a cold epoch at the local clip rate "
          f"needs {need:.0f} MB/s: cold can reach at most {res['cold_bound']['max_cold_ratio']:.2f}x here")
    bench.write_json(bench.results_path("loader", args.out, "loader_remote.json"), res)
    return 0


def store_bandwidth(bucket: str, prefix: str, manifest: dict, threads: int = 8) -> float:
    """MB/s of whole-shard GETs from the store, `threads` at a time (what a cold cache can get)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3")
    keys = [prefix + e["tar"] for e in manifest["shards"]]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        got = sum(ex.map(lambda k: len(client.get_object(Bucket=bucket, Key=k)["Body"].read()), keys))
    return got / (time.perf_counter() - t0) / 1e6


def bench_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_sharded(cache: Path, videos: int, shard_kb: int) -> Path:
    """The 112^2 benchmark corpus cut into many small shards (so a bounded cache must evict)."""
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    return cached_corpus(SynthConfig(videos=videos, seed=0, dicom_fraction=0.0, workers=2),
                         IngestConfig(size=112, codec="vp9", progress=False, workers=2, shard_size=shard_kb * 1024),
                         cache, log=lambda m: print(m, flush=True))


# ---------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    """Two panels: wall-clock sampled fps (best run) and sampled fps per CPU core (leanest run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["cpu"])
    names = list(LOADERS)
    labels = {"official": "official-style (PyAV all + PIL)", "pyav": "PyAV seek + DataLoader",
              "pyav-folded": "PyAV on the folded videos", "dali": "ClipStream, DALI's CPU decoder",
              "ours-unfolded": "ClipStream, unfolded shards", "ours": "ours: ClipStream, folded shards"}
    per_core = lambda b: T * 1e3 / b["best_cpu_ms_per_clip"]  # noqa: E731  sampled frames per CPU-s
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.13
    for ax, value, ylabel, title in (
        (axes[0], lambda b: b["sampled_fps"], "sampled frames / s",
         f"wall clock, {results['threads']} threads (best of {results['best_of']})"),
        (axes[1], per_core, "sampled frames / CPU-second", "per CPU core (load-independent)"),
    ):
        for j, name in enumerate(names):
            vals = [value(results["cpu"][s][name]) for s in sizes]
            bars = ax.bar(np.arange(len(sizes)) + (j - (len(names) - 1) / 2) * w, vals, w, label=labels[name])
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(sizes)), [f"{s}x{s}" for s in sizes])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Clip loaders: {T} frames at stride {STRIDE}, batch {BATCH}, same VP9 shards")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOADERS = ("official", "pyav", "pyav-folded", "dali", "ours-unfolded", "ours")
"""official and pyav read the unfolded videos at stride 2 (the issue's baselines); pyav-folded
reads the folded ones at stride 1 (what the format alone gives a plain loader); dali is our
stream with DALI's CPU decoder, ours-unfolded our stream on unfolded shards, ours on the
folded shards (loaders/fold.py)."""


def run_size(args, size: int, given: Path | None) -> dict:
    """Every loader at `size`, --repeats times interleaved -> {loader: best run + ratios}."""
    shards = given or build_corpus(args.cache, size, args.videos)
    folded = build_corpus(args.cache, size, args.videos, fold=STRIDE)
    videos, fvideos = extract_videos(shards, args.cache), extract_videos(folded, args.cache)
    print(f"{size}^2: {len(videos)} videos, mean {np.mean([n for _, n in videos]):.0f} frames "
          f"({np.mean([n for _, n in fvideos]):.0f} folded)", flush=True)
    runs = {k: [] for k in LOADERS}
    for r in range(args.repeats):
        for name in runs:
            if name in ("dali", "ours", "ours-unfolded"):
                res = run_clipstream(shards if name == "ours-unfolded" else folded, size, args.threads, args.clips,
                               warm=2, decoder="dali" if name == "dali" else "host")
            elif name == "official":
                res = run_torch_loader(OfficialStyle(videos, size), args.threads, args.clips, warm=2)
            elif name == "pyav":
                res = run_torch_loader(FairPyAV(videos, size), args.threads, args.clips, warm=2)
            else:
                res = run_torch_loader(FairPyAV(fvideos, size, stride=1), args.threads, args.clips, warm=2)
            runs[name].append(res)
            print(f"  run {r} {name:13s} {res['sampled_fps']:8.1f} sampled fps "
                  f"{res['decoded_fps']:8.1f} decoded fps {res['cpu_cores_used']:5.2f} cores "
                  f"{res['cpu_ms_per_clip']:6.1f} CPU-ms/clip", flush=True)
    best = {k: dict(max(v, key=lambda x: x["sampled_fps"])) for k, v in runs.items()}
    lean = {k: min(x["cpu_ms_per_clip"] for x in v) for k, v in runs.items()}
    for k in best:
        best[k]["runs"] = runs[k]
        best[k]["ratio_vs_official"] = round(best[k]["sampled_fps"] / best["official"]["sampled_fps"], 2)
        best[k]["best_cpu_ms_per_clip"] = lean[k]
        best[k]["cpu_ratio_vs_official"] = round(lean["official"] / lean[k], 2)
        best[k]["cpu_ratio_vs_pyav"] = round(lean["pyav"] / lean[k], 2)
        best[k]["decode_waste"] = round(best[k]["decoded_fps"] / best[k]["sampled_fps"], 3)
    return best


def bar(cpu: dict) -> dict:
    """Issue 26's bar, in CPU-ms per clip: 224^2 >= 2x pyav and >= 5x official, 112^2 >= 3x pyav,
    decode waste <= 1.2."""
    out = {}
    for size, best in cpu.items():
        d = best["ours"]
        need_pyav = 2.0 if size >= 224 else 3.0
        out[size] = {"x_pyav": d["cpu_ratio_vs_pyav"], "x_official": d["cpu_ratio_vs_official"],
                     "decode_waste": d["decode_waste"],
                     "ok": d["cpu_ratio_vs_pyav"] >= need_pyav and d["decode_waste"] <= 1.2
                     and (size < 224 or d["cpu_ratio_vs_official"] >= 5.0)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards-112", type=Path, default=None)
    ap.add_argument("--shards-224", type=Path, default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--videos", type=int, default=48, help="synthetic videos to build when no --shards")
    ap.add_argument("--clips", type=int, default=192, help="clips timed per loader and run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=bench.cache_dir("loader"))
    ap.add_argument("--out", type=Path, default=None, help="results JSON, PNG beside it (default: a new run folder)")
    ap.add_argument("--remote", action="store_true",
                    help="instead: local disk vs a local S3 server (cold/warm/bounded cache), 112^2")
    ap.add_argument("--shard-kb", type=int, default=256, help="--remote: shard size of the built corpus")
    ap.add_argument("--remote-videos", type=int, default=96, help="--remote: videos of the built corpus")
    args = ap.parse_args(argv)
    if args.remote:
        return remote_main(args)

    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    given = {112: args.shards_112, 224: args.shards_224}
    results = {"threads": args.threads, "clip": {"frames": T, "stride": STRIDE, "batch": BATCH},
               "codec": "vp9", "host": platform.node(), "cpus": os.cpu_count(), "cpu": {},
               "baseline_videos": "the shards' own .webm components, extracted to files",
               "best_of": args.repeats,
               "note": "wall-clock rates move with other processes' load on a shared machine; "
                       "cpu_ms_per_clip (CPU of the loader's processes in the timed window) does not"}
    for size in args.sizes:
        results["cpu"][size] = run_size(args, size, given.get(size))
    results["bar"] = bar(results["cpu"])
    if torch.cuda.is_available():
        shards = given.get(224) or build_corpus(args.cache, 224, args.videos)
        g = run_clipstream(shards, 224, args.threads, max(args.clips, 512), warm=4, backend="mixed", device="cuda")
        g["vitb_need_clips_s"] = VITB_NEED_CLIPS_S
        g["fraction_of_need"] = round(g["clips_s"] / VITB_NEED_CLIPS_S, 3)
        results["gpu_mixed_224"] = g

    print(f"\nLoader throughput ({args.threads} CPU threads, {T} frames stride {STRIDE}, batch {BATCH}, "
          f"best of {args.repeats}; waste = decoded / sampled frames):")
    print(f"{'size':>5} {'loader':13} {'clips/s':>8} {'sampled fps':>12} {'decoded fps':>12} {'waste':>6} "
          f"{'x official':>11} {'cores used':>10} {'CPU-ms/clip':>12} {'x official/CPU':>15} {'x pyav/CPU':>11}")
    for size, best in results["cpu"].items():
        for name in LOADERS:
            b = best[name]
            print(f"{size:>5} {name:13} {b['clips_s']:8.1f} {b['sampled_fps']:12.1f} {b['decoded_fps']:12.1f} "
                  f"{b['decode_waste']:6.2f} {b['ratio_vs_official']:10.2f}x {b['cpu_cores_used']:10.2f} "
                  f"{b['best_cpu_ms_per_clip']:12.1f} {b['cpu_ratio_vs_official']:14.2f}x {b['cpu_ratio_vs_pyav']:10.2f}x")
    for size, b in results["bar"].items():
        print(f"bar {size}^2: {b}")
    if "gpu_mixed_224" in results:
        g = results["gpu_mixed_224"]
        print(f"GPU mixed 224^2: {g['clips_s']:.0f} clips/s = {g['fraction_of_need']:.2f} x the ViT-B need "
              f"({VITB_NEED_CLIPS_S:.0f} clips/s)")
    else:
        print("GPU mixed backend: not run (no CUDA device here)")
    results["cpu"] = {str(k): v for k, v in results["cpu"].items()}
    results["bar"] = {str(k): v for k, v in results["bar"].items()}
    out = bench.write_json(bench.results_path("loader", args.out, "loader.json"), results)
    png = out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {png}")
    bench.announce_cache(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
