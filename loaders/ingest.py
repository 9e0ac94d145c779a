"""Ingest: sources -> decode -> sector crop -> resize -> cardiac cycle -> encode -> shards.

    report = ingest(["/data/echonet", "/data/labels.csv"], "shards/", IngestConfig(size=224))

Workers (a process pool) do the per-clip work (`process_clip`: decode once, crop, resize,
measure the cycle, encode, decode the result back to count its frames); the parent is the
single writer: it keeps one open shard per split, rotates at `shard_size`, and after each
finished shard replaces the manifest atomically (shards.py). Results come back in source
order, so the shards are the same for any worker count.

Nothing lost, nothing duplicated: a clip that fails goes to `rejects.jsonl` with the reason;
a re-run skips every source already in a manifest-listed shard (and earlier rejects).

Privacy: patient ids are hashed (`patient_hash`, optionally salted) before anything is
written; keys are `<dataset>_<patient hash>_<[tag-]source-path hash>`, and the json's
`source` is a hash of the relative source path (file names often embed patient ids; hash
your file list to find a sample's file, or match `source_sha256` against the file
contents). Only `rejects.jsonl`, an operator's file outside the shards, names paths.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from .errors import DataError
from .shards import (ShardWriter, SampleRecord, add_shard, clean_orphans, new_manifest, npy_bytes,
                     pack_nframes, read_manifest, read_sample_records, sha256_file, write_manifest)
from .sources.base import safe_name
from .video_io import CODECS

REJECTS = "rejects.jsonl"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# Settings that must match when a run resumes into an existing shard directory.
RESUME_KEYS = ("size", "codec", "fps", "gop", "quality", "sector", "min_frames", "split_fractions")


@dataclass(kw_only=True, slots=True)
class IngestConfig:
    """How sources become shards (DESIGN §2)."""

    size: int = 224
    """Output height = width in pixels (even; >= 128 for NVDEC in production)."""
    codec: str = "vp9"
    """Shard video codec: vp9 (CPU + GPU decode), h264 (GPU-only in DALI), mjpeg (intra-only)."""
    fps: float | None = None
    """Resample to this frame rate (nearest frame); None keeps the source rate."""
    default_fps: float = 30.0
    """Frame rate assumed when a source has none (e.g. NIfTI); the json marks it fps_assumed."""
    shard_size: int = 256 * 2**20
    """Rotate to a new shard after this many bytes."""
    workers: int = 1
    """Worker processes for decode/crop/encode (1: in-process)."""
    min_frames: int = 8
    """Shorter clips are rejected."""
    gop: int = 8
    """Keyframe interval (<= 8: cheap exact random-start decoding)."""
    quality: int | None = None
    """CRF for vp9/h264, q:v for mjpeg; None: the codec's default."""
    sector: bool = True
    """Detect the ultrasound sector, blank outside it and crop to it (reject when none)."""
    dataset: str | None = None
    """Dataset name in the keys; None: from the source layout."""
    salt: str = ""
    """Secret mixed into patient hashes (keeps short numeric ids from being brute-forced)."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train/val/test fractions for patients whose source gives no split."""
    retry_rejects: bool = False
    """Retry sources listed in rejects.jsonl (off: a re-run skips them)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def validate(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be even and >= 16, got {self.size}")
        if not 1 <= self.gop <= 8:
            raise ValueError(f"gop must be in 1..8, got {self.gop}")
        if self.workers < 1 or self.min_frames < 1 or self.shard_size < 1:
            raise ValueError("workers, min_frames and shard_size must be >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0 or None (keep), got {self.fps}")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be 3 numbers summing to 1, got {self.split_fractions}")

    def settings(self) -> dict:
        d = {k: getattr(self, k) for k in RESUME_KEYS}
        d["split_fractions"] = list(self.split_fractions)
        d["gop"], d["default_fps"] = self.gop, self.default_fps
        d["salted"] = bool(self.salt)
        return d


@dataclass(kw_only=True, slots=True)
class IngestReport:
    """What one ingest run did."""

    added: int = 0
    skipped: int = 0
    """Sources already in the manifest (or rejected before) that this run skipped."""
    rejected: int = 0
    shards: list[str] = field(default_factory=list)
    """Shard tars written by this run."""
    frames: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0

    @property
    def clips_per_s(self) -> float:
        return (self.added + self.rejected) / max(self.seconds, 1e-9)

    @property
    def input_mb_per_s(self) -> float:
        return self.input_bytes / 2**20 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(clips_per_s=self.clips_per_s, input_mb_per_s=self.input_mb_per_s)
        return d


# ---------------------------------------------------------------- planning (parent)


def patient_hash(dataset: str, patient: str, salt: str = "") -> str:
    """16 hex chars of sha256: the only patient identity that reaches keys and json."""
    return hashlib.sha256(f"{salt}{dataset}:{patient}".encode()).hexdigest()[:16]


def source_hash(path: str) -> str:
    """16 hex chars of sha256 of a path: the json's `source` and the resume identity (paths
    often embed patient ids, so they stay out of the shards)."""
    return hashlib.sha256(path.encode()).hexdigest()[:16]


def hash_split(phash: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of a patient from its hash (uniform in [0, 1) -> train/val/test)."""
    u = int(hashlib.sha256(f"split:{phash}".encode()).hexdigest()[:12], 16) / 16**12
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


@dataclass(kw_only=True, slots=True)
class Job:
    """One clip to process, with everything the parent decided (key, split, patient hash)."""

    clip: object
    key: str
    phash: str
    split: str


def plan(clips: list, cfg: IngestConfig, existing: list[dict]) -> list[Job]:
    """Assign keys and by-patient splits; raise DataError when a source puts one patient in two splits."""
    by_patient: dict[str, str] = {r["patient"]: r["split"] for r in existing}
    source_split: dict[str, tuple[str, str]] = {}
    jobs, keys = [], {r["key"] for r in existing}
    for c in clips:
        ds = safe_name(cfg.dataset or c.dataset) or "data"  # the key's first part: no '_'
        ph = patient_hash(ds, c.patient, cfg.salt)
        if c.split:
            s = SPLIT_ALIASES.get(c.split.lower())
            if s is None:
                raise DataError(f"{c.rel_source or c.source}: unknown split {c.split!r} (use train/val/test)")
            prev = source_split.setdefault(ph, (s, c.rel_source or c.source))
            if prev[0] != s:
                raise DataError(f"patient {ph} is in split {prev[0]!r} ({prev[1]}) and {s!r} "
                                f"({c.rel_source or c.source}): splits must be by patient")
        tag = (safe_name(c.clip_id) + "-") if c.clip_id else ""
        key = f"{ds}_{ph}_{tag}{source_hash(c.rel_source or c.source)[:10]}"
        if key in keys:  # same relative path under two roots: disambiguate by the absolute one
            key += "-" + source_hash(os.path.abspath(c.source))[:6]
        keys.add(key)
        jobs.append(Job(clip=c, key=key, phash=ph, split=""))
    for j in jobs:
        s = source_split.get(j.phash, (None,))[0]
        if j.phash in by_patient and s and by_patient[j.phash] != s:
            raise DataError(f"patient {j.phash}: already ingested in split {by_patient[j.phash]!r}, "
                            f"{j.clip.rel_source or j.clip.source} says {s!r}")
        j.split = by_patient.get(j.phash) or s or hash_split(j.phash, cfg.split_fractions)
        by_patient[j.phash] = j.split
    return jobs


# ---------------------------------------------------------------- per clip (worker)


def resample_fps(n: int, fps_in: float, fps_out: float) -> np.ndarray:
    """Source frame indices (nearest) for a clip of n frames re-timed from fps_in to fps_out."""
    m = max(1, int(np.floor(n * fps_out / fps_in + 1e-6)))
    return np.minimum(np.floor(np.arange(m) * fps_in / fps_out + 0.5).astype(np.int64), n - 1)


def process_clip(job: Job, cfg: IngestConfig) -> dict:
    """Decode, crop, resize, measure, encode one clip. Never raises for bad data: returns
    {"ok": False, "reason": ...} instead, so one bad file cannot stop the run."""
    from .cycles import estimate_cycle
    from .sector import crop_resize, crop_resize_seg, detect_sector
    from .sources.base import load_clip
    from .video_io import count_frames, encode_video

    c = job.clip
    try:
        in_bytes = os.path.getsize(c.source)
        sha = sha256_file(c.source)
    except OSError as e:
        return {"ok": False, "reason": f"cannot read file ({e})", "job": job, "in_bytes": 0}
    fail = lambda reason: {"ok": False, "reason": reason, "job": job, "in_bytes": in_bytes}  # noqa: E731
    try:
        dec = load_clip(c)
    except DataError as e:
        return fail(str(e))
    except Exception as e:  # a decoder library choking on a damaged file
        return fail(f"cannot decode ({type(e).__name__}: {e})")
    frames, seg, seg_frames = dec.frames, dec.seg, dec.seg_frames
    fps, fps_assumed = dec.fps, False
    if not fps or fps <= 0:
        fps, fps_assumed = cfg.default_fps, True
    if cfg.fps and abs(cfg.fps - fps) > 1e-3:
        idx = resample_fps(len(frames), fps, cfg.fps)
        frames = frames[idx]
        if seg is not None:
            # Each annotation moves to the output frame nearest in time (within half an output
            # frame), so none is lost when resampling drops its source frame.
            new = np.zeros((len(idx),) + seg.shape[1:], np.uint8)
            moved = {}
            for t in seg_frames:
                moved[min(int(np.floor(t * cfg.fps / fps + 0.5)), len(idx) - 1)] = t
            for i, t in moved.items():
                new[i] = seg[t]
            seg, seg_frames = new, sorted(moved)
        fps = cfg.fps
    if len(frames) < cfg.min_frames:
        return fail(f"too short: {len(frames)} frames < min_frames {cfg.min_frames}")
    sector = None
    if cfg.sector:
        sector = detect_sector(frames)
        if sector is None:
            return fail("no ultrasound sector found (no region of pixels changes over time)")
    src_h, src_w = frames.shape[1:3]
    out = crop_resize(frames, sector, cfg.size)
    cyc = estimate_cycle(out, fps)
    try:
        data = encode_video(out, fps, cfg.codec, gop=cfg.gop, quality=cfg.quality)
        n = count_frames(data)
    except Exception as e:
        return fail(f"encode failed ({type(e).__name__}: {e})")
    if n != len(out):
        return fail(f"encoded video decodes to {n} frames, expected {len(out)}")
    meta = {
        "key": job.key, "frames": n, "fps": round(float(fps), 4), "height": cfg.size,
        "width": cfg.size, "period": None if cyc.period is None else round(cyc.period, 3),
        "ed": cyc.ed, "es": cyc.es, "view": c.view, "labels": c.labels, "patient": job.phash,
        "split": job.split, "source": source_hash(c.rel_source or os.path.basename(c.source)),
        "source_sha256": sha, "codec": cfg.codec, "dataset": job.key.split("_", 1)[0],
        "source_size": [int(src_h), int(src_w)],
        "sector_box": list(sector.box) if sector is not None else None,
    }
    if fps_assumed:
        meta["fps_assumed"] = True
    comps = [(CODECS[cfg.codec].ext, data)]
    if seg is not None:
        meta["seg_frames"] = [int(t) for t in seg_frames]
        comps.append(("seg.npy", npy_bytes(crop_resize_seg(seg, sector, cfg.size))))
    comps.insert(1, ("json", json.dumps(meta).encode()))
    comps.insert(2, ("nframes", pack_nframes(n)))
    return {"ok": True, "job": job, "components": comps, "frames": n, "in_bytes": in_bytes,
            "sha256": sha}


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one clip per process; the pool supplies the parallelism


# ---------------------------------------------------------------- the run (parent)


def _read_rejects(out_dir: Path) -> set[str]:
    p = out_dir / REJECTS
    if not p.exists():
        return set()
    done = set()
    for line in p.read_text().splitlines():
        try:
            done.add(json.loads(line)["source"])
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def ingest(sources: list[str | Path], out_dir: str | Path, cfg: IngestConfig | None = None) -> IngestReport:
    """Ingest every clip of `sources` into shards under `out_dir`; resumable and idempotent."""
    from .sources import discover

    cfg = cfg or IngestConfig()
    cfg.validate()
    if cfg.size < 128:
        warnings.warn(f"ingest size {cfg.size} < 128: NVDEC (the GPU decoder) needs at least 128x128; "
                      "fine for CPU tests and demos only", stacklevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = IngestReport()

    if (out_dir / "manifest.json").exists():
        manifest = read_manifest(out_dir)
        old = manifest["settings"]
        diff = [k for k in RESUME_KEYS if k in old and old[k] != cfg.settings()[k]]
        if diff:
            raise DataError(f"{out_dir}: shards were written with " + ", ".join(
                f"{k}={old[k]!r}" for k in diff) + "; this run asks for " + ", ".join(
                f"{k}={cfg.settings()[k]!r}" for k in diff) + " (use a new --out directory)")
    else:
        if any(p.suffix in (".tar", ".idx") for p in out_dir.glob("shard-*")):
            raise DataError(f"{out_dir}: holds shard files but no manifest.json; ingest into an empty "
                            "directory (or one written by `echofm ingest`)")
        manifest = new_manifest(codec=cfg.codec, video_ext=CODECS[cfg.codec].ext, height=cfg.size,
                                width=cfg.size, settings=cfg.settings())
        # Written before any shard: from here on every shard file not listed in it is a
        # leftover of an interrupted run, safe to remove.
        write_manifest(out_dir, manifest)
    clean_orphans(out_dir, manifest)
    existing = read_sample_records(out_dir, manifest)
    done = {r["source"] for r in existing}  # hashed absolute paths
    rejected = set() if cfg.retry_rejects else _read_rejects(out_dir)

    clips = []
    for s in sources:
        clips += discover(s, dataset=cfg.dataset)
    todo, seen = [], set()
    for c in clips:  # a file named twice (a folder and a CSV listing it) is ingested once
        a = os.path.abspath(c.source)
        if a not in seen and a not in rejected and source_hash(a) not in done:
            todo.append(c)
        seen.add(a)
    report.skipped = len(clips) - len(todo)
    jobs = plan(todo, cfg, existing)

    next_index = max((int(s["tar"][6:12]) for s in manifest["shards"]), default=-1) + 1
    writers: dict[str, ShardWriter] = {}

    def finish(split: str) -> None:
        w = writers.pop(split)
        entry = w.finalize()
        add_shard(manifest, entry)
        write_manifest(out_dir, manifest)
        report.shards.append(entry["tar"])
        report.output_bytes += entry["bytes"]

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="clip", disable=not cfg.progress, dynamic_ncols=True)
    pool = None
    try:
        if cfg.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            pool = mp.get_context("forkserver").Pool(cfg.workers, initializer=_init_worker)
            results = pool.imap(partial(process_clip, cfg=cfg), jobs, chunksize=1)
        else:
            results = (process_clip(j, cfg) for j in jobs)
        with open(out_dir / REJECTS, "a") as rej:
            for r in results:
                job = r["job"]
                report.input_bytes += r["in_bytes"]
                if not r["ok"]:
                    report.rejected += 1
                    rej.write(json.dumps({"source": os.path.abspath(job.clip.source), "key": job.key,
                                          "reason": r["reason"], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
                    rej.flush()
                else:
                    w = writers.get(job.split)
                    if w is None:
                        w = writers[job.split] = ShardWriter(out_dir=out_dir, index=next_index, split=job.split)
                        next_index += 1
                    rec = SampleRecord(key=job.key, source=source_hash(os.path.abspath(job.clip.source)),
                                       source_sha256=r["sha256"], patient=job.phash, split=job.split,
                                       frames=r["frames"])
                    try:
                        w.add(job.key, r["components"], rec)
                    except BaseException:
                        writers.pop(job.split).abort()  # a half-written sample: drop the shard
                        raise
                    report.added += 1
                    report.frames += r["frames"]
                    if w.bytes >= cfg.shard_size:
                        finish(job.split)
                bar.update(1)
                dt = time.perf_counter() - t0
                bar.set_postfix_str(f"{report.input_bytes / 2**20 / dt:.1f} MB/s, rejects {report.rejected}")
    finally:
        # Complete samples are kept on any exit (Ctrl-C included); kill -9 leaves only *.tmp
        # files, which the next run removes.
        for split in list(writers):
            if writers[split].samples:
                finish(split)
            else:
                writers.pop(split).abort()
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    report.seconds = time.perf_counter() - t0
    return report
