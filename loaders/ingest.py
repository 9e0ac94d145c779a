"""Ingest: sources -> decode -> sector crop -> resize -> cardiac cycle -> encode -> shards.

    report = ingest(["/data/echonet", "/data/labels.csv"], "shards/", IngestConfig(size=224))

Plan (parent): discover the clips, hash every source's content (sha256, cached by path, size
and mtime), skip content the corpus already holds (resume is by content: a moved or renamed
tree adds nothing), record repeated content once, assign keys and by-patient splits.
Per clip (workers, `process_clip`): decode frame by frame through resize (memory bounded by
the output size), reject damaged decodes, crop to the fan, measure the cycle, encode, count
the frames back. Write (parent, the single writer): one open shard per split, rotated at
`shard_size`; after each finished shard the manifest is replaced atomically (shards.py).
Results come back in source order, so the shards are the same for any worker count; a
worker that dies (the OOM killer) costs its clip a reject, not the run.

Nothing lost, nothing duplicated: every clip ends in a shard or in `rejects.jsonl` with the
reason; transient rejects (missing file, I/O error) are retried by the next run, others by
`retry_rejects`. An exclusive lock keeps a second ingest out of the same directory.

Privacy (ids.py): patient ids and source paths are HMAC'd with the corpus's secret id key,
which lives outside the shard directory. Keys are `<dataset>_<patient hmac>_<[tag-]content
sha256[:12]>`; the json's `source` is the HMAC of the path relative to the root the user
named; rejects.jsonl and the quality report hold the same hashes, never a path or a name.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from . import ids
from .errors import DataError
from .fold import fold_frames
from .quality import SPLITS, ClipStats, CorpusStats, QualityReport
from .reject_log import RejectedFile, rejected_file, write_log
from .shards import (DirLock, SampleRecord, ShardWriter, add_shard, clean_orphans, new_manifest, npy_bytes,
                     pack_nframes, read_manifest, read_sample_records, sha256_file, write_manifest)
from .sources.base import Clip, Discovery, allowed_labels, looks_identifying, safe_name
from .video_io import CODECS

REJECTS = "rejects.jsonl"
REPORT = "quality_report.json"
HASH_CACHE = ".source_hashes.json"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# Settings that must match when a run resumes into an existing shard directory.
RESUME_KEYS = ("size", "codec", "fps", "fold_stride", "gop", "quality", "sector", "min_frames", "split_fractions", "id_key")


class Kind:
    """Reject reasons (rejects.jsonl `kind`, the report's keys)."""

    MISSING = "missing_file"
    IO = "io_error"
    DECODE = "cannot_decode"
    CORRUPT = "corrupt_frames"
    SHORT = "too_short"
    NO_SECTOR = "no_sector"
    ENCODE = "encode_failed"
    WORKER = "worker_died"
    TIMEOUT = "timeout"
    INTERNAL = "internal_error"
    GROWING = "source_changing"
    """The file changed between hashing and decoding (still being written?): retried."""
    CHANGED = "source_changed"
    """The corpus holds another content of the same source (dataset + path): never a second sample."""
    TRANSIENT = (MISSING, IO, GROWING)
    """Retried by the next run without asking: the file may be back."""


@dataclass(kw_only=True, slots=True)
class IngestConfig:
    """How sources become shards (docs/shards.md)."""

    size: int = 224
    """Output height = width in pixels (even; >= 128 for NVDEC in production)."""
    codec: str = "vp9"
    """Shard video codec: vp9 (CPU + GPU decode), h264 (GPU-only in DALI), mjpeg (intra-only)."""
    fps: float | None = None
    """Resample to this frame rate (nearest frame); None keeps the source rate."""
    fold_stride: int = 1
    """Keep every n-th frame (after `fps`): the training stride folded into the shards, so the
    stream decodes at stride 1 what it samples (loaders/fold.py, docs/shards.md); 1 keeps all."""
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
    decode_side: int | None = None
    """Frames are shrunk while decoding so their shorter side is at most this (memory follows
    the output size, not the source's); None: 3 x size (the crop, usually 60-100% of the
    frame, is then still larger than the output: no detail lost)."""
    dataset: str | None = None
    """Dataset name in the keys; None: from the source layout."""
    id_key: str | None = None
    """File holding the corpus's secret id key (hex); None: `<out>.idkey`, created on first ingest."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train/val/test fractions for patients whose source gives no split."""
    retry_rejects: bool = False
    """Retry sources rejected for good by an earlier run (transient rejects are always retried)."""
    dry_run: bool = False
    """Scan, decode and measure every new clip and report; write nothing (no shards, no key)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    label_columns: tuple[str, ...] = ()
    """Source label columns to keep beyond the allowlist (`sources.base.LABEL_KEYS`, e.g. a
    custom task's label); names that look like identifiers are refused."""
    clip_timeout: float = 600.0
    """Seconds one clip may take in a worker process (workers > 1); a worker past it (hung,
    stopped) is killed and its clip rejected as `timeout`."""

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
        if self.fold_stride < 1:
            raise ValueError(f"fold_stride must be >= 1, got {self.fold_stride}")
        bad = [c for c in self.label_columns if looks_identifying(c)]
        if bad:
            raise ValueError(f"label_columns {bad} look like patient identifiers: never written into shards")
        if self.clip_timeout <= 0:
            raise ValueError(f"clip_timeout must be > 0 seconds, got {self.clip_timeout}")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be 3 numbers summing to 1, got {self.split_fractions}")

    @property
    def keep_side(self) -> int:
        return self.decode_side or 3 * self.size

    def settings(self, key: bytes) -> dict:
        d = {k: getattr(self, k) for k in RESUME_KEYS if k != "id_key"}
        d["split_fractions"] = list(self.split_fractions)
        d["default_fps"] = self.default_fps
        d["id_key"] = ids.fingerprint(key)
        d["ids"] = "hmac-sha256"
        return d


@dataclass(kw_only=True, slots=True)
class IngestReport:
    """What one ingest run did."""

    added: int = 0
    skipped: int = 0
    """Sources whose content the corpus already holds (or rejected for good before)."""
    duplicates: int = 0
    """Sources repeating content already seen in this run (recorded once)."""
    rejected: int = 0
    shards: list[str] = field(default_factory=list)
    """Shard tars written by this run."""
    frames: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    id_key: str = ""
    """The id key file used (keep it: later runs need it)."""
    id_key_created: bool = False
    quality: QualityReport = field(default_factory=QualityReport)
    rejected_files: list[RejectedFile] = field(default_factory=list)
    """This run's rejects by path: for the console and `<out>.rejects.jsonl` (reject_log.py), never the shards."""

    @property
    def clips_per_s(self) -> float:
        return (self.added + self.rejected) / max(self.seconds, 1e-9)

    @property
    def input_mb_per_s(self) -> float:
        return self.input_bytes / 2**20 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("quality", "rejected_files")}
        d.update(clips_per_s=self.clips_per_s, input_mb_per_s=self.input_mb_per_s, quality=self.quality.to_dict())
        return d


@dataclass(kw_only=True, slots=True)
class Job:
    """One clip to process, with everything the parent decided."""

    clip: Clip
    key: str
    phash: str
    """HMAC of the patient id."""
    study: str
    """HMAC of (patient, study id): `ids.study_hash`."""
    split: str
    sha256: str
    """Content hash of the source file (the resume and duplicate identity)."""
    source: str
    """HMAC of the source path relative to its root (json `source`, rejects)."""
    size: int = 0
    mtime_ns: int | None = None
    """The source's size and mtime when it was hashed: the decode must see the same file."""


@dataclass(kw_only=True, slots=True)
class Reject:
    kind: str
    message: str
    """One line, no path (the source is named by its hash)."""

    @property
    def transient(self) -> bool:
        return self.kind in Kind.TRANSIENT


@dataclass(kw_only=True, slots=True)
class ClipResult:
    """A worker's answer for one Job: components to write, or a reject."""

    job: Job
    reject: Reject | None = None
    components: list[tuple[str, bytes]] = field(default_factory=list)
    frames: int = 0
    stats: ClipStats | None = None


# ---------------------------------------------------------------- planning (parent)


def hash_split(phash: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of a patient from its (keyed) hash: uniform in [0, 1) -> train/val/test."""
    u = int(ids.keyed(b"split", phash, 12), 16) / 16**12
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def _source_split(c: Clip, ph: str, seen: dict[str, tuple[str, str]]) -> str | None:
    """The split a source names for this clip (normalised); DataError on an unknown name or on
    one patient named in two splits."""
    if not c.split:
        return None
    s = SPLIT_ALIASES.get(c.split.lower())
    where = c.rel_source or os.path.basename(c.source)
    if s is None:
        raise DataError(f"{where}: unknown split {c.split!r} (use train/val/test)")
    prev = seen.setdefault(ph, (s, where))
    if prev[0] != s:
        raise DataError(f"patient {ph} is in split {prev[0]!r} ({prev[1]}) and {s!r} ({where}): "
                        "splits must be by patient")
    return s


def plan(clips: list[Clip], shas: list[str], cfg: IngestConfig, existing: list[dict], key: bytes) -> list[Job]:
    """Keys and by-patient splits for clips with their content hashes; DataError when a source
    puts one patient in two splits (or contradicts the corpus)."""
    by_patient: dict[str, str] = {r["patient"]: r["split"] for r in existing}
    named: dict[str, tuple[str, str]] = {}
    jobs = []
    for c, sha in zip(clips, shas):
        ds = safe_name(cfg.dataset or c.dataset) or "data"  # the key's first part: no '_'
        ph = ids.patient_hash(key, ds, c.patient)
        study = ids.study_hash(key, ds, c.patient, c.study)
        if c.dataset_from_path and not cfg.dataset:
            ds = "d" + ids.keyed(key, f"dataset:{ds}", 8)  # a folder's name may name a patient
        s = _source_split(c, ph, named)
        if s and by_patient.get(ph, s) != s:
            raise DataError(f"patient {ph}: already ingested in split {by_patient[ph]!r}, "
                            f"{c.rel_source or os.path.basename(c.source)} says {s!r}")
        tag = (safe_name(c.clip_id) + "-") if c.clip_id else ""
        jobs.append(Job(clip=c, key=f"{ds}_{ph}_{tag}{sha[:12]}", phash=ph, study=study, split=s or "", sha256=sha,
                        source=ids.path_hash(key, c.rel_source or os.path.basename(c.source))))
    for j in jobs:
        j.split = by_patient.get(j.phash) or named.get(j.phash, (None,))[0] or hash_split(j.phash, cfg.split_fractions)
        by_patient[j.phash] = j.split
    return jobs


_GROWING = "source changed while it was read (still being written?); retried by the next run"


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Same size and mtime: what was hashed is what is decoded (a growing file changes both)."""
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _hash_sources(clips: list[Clip], cache_path: Path | None, key: bytes) -> list[list | Reject]:
    """[size, mtime_ns, sha256] of every clip's file (threads; cached by keyed path + size +
    mtime), or a transient Reject when the file is missing, unreadable or changed while read."""
    from concurrent.futures import ThreadPoolExecutor

    cache: dict = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}

    def one(c: Clip) -> tuple[str | None, list] | Reject:
        tag = ids.keyed(key, "abs:" + os.path.abspath(c.source))
        try:
            st = os.stat(c.source)
            hit = cache.get(tag)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                return tag, hit
            sha = sha256_file(c.source)
            if not _same_file(st, os.stat(c.source)):
                return Reject(kind=Kind.GROWING, message=_GROWING)
            return tag, [st.st_size, st.st_mtime_ns, sha]
        except FileNotFoundError:
            link = os.path.islink(c.source)
            return Reject(kind=Kind.MISSING, message="source file missing" + (" (dangling symlink)" if link else ""))
        except OSError as e:
            return Reject(kind=Kind.IO, message=f"cannot read source ({type(e).__name__}: {e.strerror or e})")

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(one, clips))
    fresh = {g[0]: g[1] for g in got if not isinstance(g, Reject)}
    if cache_path is not None and fresh != {k: cache.get(k) for k in fresh}:
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps({**cache, **fresh}))
        os.replace(tmp, cache_path)
    return [g if isinstance(g, Reject) else g[1] for g in got]


# ---------------------------------------------------------------- per clip (worker)


def resample_fps(n: int, fps_in: float, fps_out: float) -> np.ndarray:
    """Source frame indices (nearest) for a clip of n frames re-timed from fps_in to fps_out."""
    m = max(1, int(np.floor(n * fps_out / fps_in + 1e-6)))
    return np.minimum(np.floor(np.arange(m) * fps_in / fps_out + 0.5).astype(np.int64), n - 1)


def _retime(frames: np.ndarray, seg, seg_frames: list[int], fps: float, fps_out: float):
    """Frames (and masks) resampled to fps_out -> (frames, seg, seg_frames). Each annotation moves
    to the output frame nearest in time, so none is lost when its source frame is dropped."""
    idx = resample_fps(len(frames), fps, fps_out)
    if seg is None:
        return frames[idx], None, seg_frames
    new = np.zeros((len(idx),) + seg.shape[1:], np.uint8)
    moved = {min(int(np.floor(t * fps_out / fps + 0.5)), len(idx) - 1): t for t in seg_frames}
    for i, t in moved.items():
        new[i] = seg[t]
    return frames[idx], new, sorted(moved)


def _scrub(message: str, clip: Clip) -> str:
    """A decoder's message without the file's path (paths may name the patient)."""
    subs = [(clip.source, "<source>"), (os.path.abspath(clip.source), "<source>")]
    if clip.seg is not None and clip.seg.path:
        subs += [(clip.seg.path, "<mask>"), (os.path.abspath(clip.seg.path), "<mask>")]
    for path, token in sorted(subs, key=lambda st: -len(st[0])):
        message = message.replace(path, token)
    return message


def _decode(job: Job, cfg: IngestConfig):
    """-> Decoded, or a Reject."""
    from .sources.load import load_clip

    c = job.clip
    try:
        before = os.stat(c.source)
        dec = load_clip(c, short_side=cfg.keep_side)
        after = os.stat(c.source)
    except FileNotFoundError:
        return Reject(kind=Kind.MISSING, message="source file missing")
    except DataError as e:
        if not os.path.exists(c.source):  # gone since it was hashed: try again next run
            return Reject(kind=Kind.MISSING, message="source file missing")
        return Reject(kind=Kind.DECODE, message=_scrub(str(e), c))
    except OSError as e:
        return Reject(kind=Kind.IO, message=_scrub(f"cannot read ({type(e).__name__}: {e})", c))
    except Exception as e:  # a decoder library choking on a damaged file
        return Reject(kind=Kind.DECODE, message=_scrub(f"cannot decode ({type(e).__name__}: {e})", c))
    if job.mtime_ns is not None and not (_same_file(before, after) and (before.st_size, before.st_mtime_ns) == (job.size, job.mtime_ns)):
        return Reject(kind=Kind.GROWING, message=_GROWING)
    if dec.problems:
        return Reject(kind=Kind.CORRUPT, message=f"damaged file: {dec.problems}")
    return dec


def process_clip(job: Job, cfg: IngestConfig) -> ClipResult:
    """Decode, crop, resize, measure, encode one clip. Never raises for bad data (or a bug): the
    result then carries a Reject, so one file cannot stop the run."""
    try:
        return _process(job, cfg)
    except Exception as e:  # keep a 290k-clip run going; the report counts these
        return ClipResult(job=job, reject=Reject(kind=Kind.INTERNAL, message=_scrub(f"{type(e).__name__}: {e}", job.clip)))


def _process(job: Job, cfg: IngestConfig) -> ClipResult:
    from .cycles import estimate_cycle
    from .sector import crop_resize, crop_resize_seg, detect_sector

    fail = lambda kind, msg: ClipResult(job=job, reject=Reject(kind=kind, message=msg))  # noqa: E731
    dec = _decode(job, cfg)
    if isinstance(dec, Reject):
        return ClipResult(job=job, reject=dec)
    frames, seg, seg_frames = dec.frames, dec.seg, dec.seg_frames
    fps, fps_assumed = (dec.fps, False) if dec.fps and dec.fps > 0 else (cfg.default_fps, True)
    if cfg.fps and abs(cfg.fps - fps) > 1e-3:
        frames, seg, seg_frames = _retime(frames, seg, seg_frames, fps, cfg.fps)
        fps = cfg.fps
    source_fps = fps
    frames, seg, seg_frames = fold_frames(frames, seg, seg_frames, cfg.fold_stride)
    fps = fps / cfg.fold_stride
    if len(frames) < cfg.min_frames:
        return fail(Kind.SHORT, f"too short: {len(frames)} frames < min_frames {cfg.min_frames}")
    sector = detect_sector(frames) if cfg.sector else None
    if cfg.sector and sector is None:
        return fail(Kind.NO_SECTOR, "no ultrasound sector found (no region of pixels changes over time, or "
                    "several: a figure of clips, a dual view)")
    out = crop_resize(frames, sector, cfg.size)
    cyc = estimate_cycle(out, fps, view=job.clip.view)
    video = None
    if not cfg.dry_run:
        video = _encode(out, fps, cfg)
        if isinstance(video, Reject):
            return ClipResult(job=job, reject=video)
    n = len(out) if video is None else video[1]
    meta = _meta(job, cfg, dec, fps, fps_assumed, n, sector, cyc)
    meta.update(stride_folded=cfg.fold_stride, source_fps=round(float(source_fps), 4))
    if seg is not None:
        meta["seg_frames"] = [int(t) for t in seg_frames]
    comps = []
    if video is not None:
        comps = [video[0], ("json", json.dumps(meta).encode()), ("nframes", pack_nframes(n))]
        if seg is not None:
            comps.append(("seg.npy", npy_bytes(crop_resize_seg(seg, sector, cfg.size))))
    stats = ClipStats(source_size=tuple(dec.source_size), fps=float(fps), frames=n, period=cyc.period is not None,
                      ed_es=bool(cyc.ed), crop_fraction=meta["crop_fraction"])
    return ClipResult(job=job, components=comps, frames=n, stats=stats)


def _encode(out: np.ndarray, fps: float, cfg: IngestConfig):
    """-> ((video ext, bytes), frames it decodes to), or a Reject."""
    from .video_io import count_frames, encode_video

    try:
        data = encode_video(out, fps, cfg.codec, gop=cfg.gop, quality=cfg.quality)
        n = count_frames(data)
    except Exception as e:
        return Reject(kind=Kind.ENCODE, message=f"encode failed ({type(e).__name__}: {e})")
    if n != len(out):
        return Reject(kind=Kind.ENCODE, message=f"encoded video decodes to {n} frames, expected {len(out)}")
    return (CODECS[cfg.codec].ext, data), n


def _meta(job: Job, cfg: IngestConfig, dec, fps: float, fps_assumed: bool, n: int, sector, cyc) -> dict:
    """The sample's json (docs/shards.md: what ingest measured, with its confidence)."""
    c = job.clip
    src_h, src_w = dec.source_size
    box = None if sector is None else [int(round(v / dec.scale)) for v in sector.box]
    if box is not None:
        box = [min(box[0], src_h), min(box[1], src_h), min(box[2], src_w), min(box[3], src_w)]
    meta = {
        "key": job.key, "frames": n, "fps": round(float(fps), 4), "height": cfg.size, "width": cfg.size,
        "period": None if cyc.period is None else round(cyc.period, 3), "ed": cyc.ed, "es": cyc.es,
        "period_confidence": round(cyc.period_confidence, 3), "ed_es_confidence": round(cyc.ed_es_confidence, 3),
        "rhythm_cv": cyc.rhythm_cv, "view": c.view, "labels": c.labels, "patient": job.phash, "study": job.study,
        "split": job.split,
        "source": job.source, "source_sha256": job.sha256, "codec": cfg.codec, "dataset": job.key.split("_", 1)[0],
        "source_size": [int(src_h), int(src_w)], "sector_box": box,
        "sector_shape": None if sector is None else sector.shape,
        "crop_fraction": 0.0 if box is None else round(1 - (box[1] - box[0]) * (box[3] - box[2]) / (src_h * src_w), 4),
    }
    if fps_assumed:
        meta["fps_assumed"] = True
    return meta


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one clip per process; the pool supplies the parallelism


# ---------------------------------------------------------------- the run (parent)


@dataclass(kw_only=True, slots=True)
class _Corpus:
    """The shard directory as this run found it."""

    out_dir: Path
    manifest: dict
    key: bytes
    key_path: Path
    key_created: bool
    records: list[dict]
    done: set[str]
    """Content hashes the corpus holds."""
    rejected: set[str]
    """Content hashes rejected for good by earlier runs (skipped unless retry_rejects)."""


def _open_corpus(out_dir: Path, cfg: IngestConfig) -> _Corpus:
    """Read (or start) the manifest, the id key, the sample records and the earlier rejects;
    refuse a resume with other settings or another key."""
    import secrets

    key_path = Path(cfg.id_key).resolve() if cfg.id_key else ids.default_key_path(out_dir)
    if key_path.parent == out_dir.resolve() or out_dir.resolve() in key_path.parents:
        warnings.warn(f"{key_path}: the id key is inside the shard directory {out_dir}: whoever gets a copy of "
                      "the shards can link samples back to patients; keep it elsewhere (--id-key)", stacklevel=4)
    if (out_dir / "manifest.json").exists():
        manifest = read_manifest(out_dir)
        old = manifest["settings"]
        if old.get("ids") != "hmac-sha256":
            raise DataError(f"{out_dir}: written by an older echofm with unkeyed patient hashes (brute-forceable); "
                            "ingest into a new --out")
        key, created = ids.load_key(key_path, create=False)
        new = cfg.settings(key)
        old.setdefault("fold_stride", 1)  # written before folding existed: every frame kept
        diff = [k for k in RESUME_KEYS if k in old and old[k] != new[k]]
        if "id_key" in diff:
            raise DataError(f"{key_path}: not the id key this corpus was ingested with (fingerprint {new['id_key']}, "
                            f"the manifest says {old['id_key']}); pass the original with --id-key")
        if diff:
            raise DataError(f"{out_dir}: shards were written with " + ", ".join(f"{k}={old[k]!r}" for k in diff)
                            + "; this run asks for " + ", ".join(f"{k}={new[k]!r}" for k in diff)
                            + " (use a new --out directory)")
        records = read_sample_records(out_dir, manifest)
    else:
        if out_dir.is_dir() and any(p.suffix in (".tar", ".idx") for p in out_dir.glob("shard-*")):
            raise DataError(f"{out_dir}: holds shard files but no manifest.json; ingest into an empty "
                            "directory (or one written by `echofm ingest`)")
        if cfg.dry_run and not key_path.exists():
            key, created = secrets.token_bytes(32), False  # a dry run writes nothing, not even a key
        else:
            key, created = ids.load_key(key_path, create=True)
        manifest = new_manifest(codec=cfg.codec, video_ext=CODECS[cfg.codec].ext, height=cfg.size,
                                width=cfg.size, settings=cfg.settings(key))
        records = []
        if not cfg.dry_run:
            # written before any shard: from here on every shard file not listed in it is a
            # leftover of an interrupted run, safe to remove
            write_manifest(out_dir, manifest)
    if not cfg.dry_run:
        clean_orphans(out_dir, manifest)
    rejected = set() if cfg.retry_rejects else _permanent_rejects(out_dir)
    return _Corpus(out_dir=out_dir, manifest=manifest, key=key, key_path=key_path, key_created=created,
                   records=records, done={r["source_sha256"] for r in records}, rejected=rejected)


def _permanent_rejects(out_dir: Path) -> set[str]:
    """Content hashes of the earlier rejects that are not transient (a missing file is retried)."""
    p = out_dir / REJECTS
    if not p.exists():
        return set()
    out = set()
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not r.get("transient") and r.get("source_sha256"):
            out.add(r["source_sha256"])
    return out


def _select(clips: list[Clip], corpus: _Corpus, cfg: IngestConfig, report: IngestReport):
    """Jobs for the new content; skipped / duplicates counted; unreadable sources -> early rejects."""
    uniq, paths = [], set()
    for c in clips:  # a file named twice (a folder and a CSV listing it) is one source
        a = os.path.abspath(c.source)
        report.skipped += a in paths
        if a not in paths:
            paths.add(a)
            uniq.append(c)
    hashed = _hash_sources(uniq, None if cfg.dry_run else corpus.out_dir / HASH_CACHE, corpus.key)
    # one source = dataset + patient + path (relative to the root named); two sites' `clip1.mp4`
    # under one --dataset differ by patient
    held = {(r["key"].split("_", 1)[0], r["patient"], r["source"]): r["key"] for r in corpus.records}
    early, todo, todo_sha, seen, stat = [], [], [], set(), {}
    for c, got in zip(uniq, hashed):
        h = got if isinstance(got, Reject) else got[2]
        src = ids.path_hash(corpus.key, c.rel_source or os.path.basename(c.source))
        if isinstance(h, Reject):
            stub = Job(clip=c, key="", phash="", study="", split="", sha256="", source=src)
            early.append(ClipResult(job=stub, reject=h))
        elif h in corpus.done or h in corpus.rejected:
            report.skipped += 1
        elif h in seen:
            report.duplicates += 1
            report.quality.duplicates.append(ids.path_hash(corpus.key, c.rel_source or os.path.basename(c.source)))
        else:
            seen.add(h)
            todo.append(c)
            todo_sha.append(h)
            stat[h] = got[:2]
    jobs = []
    for j in plan(todo, todo_sha, cfg, corpus.records, corpus.key):
        j.size, j.mtime_ns = stat[j.sha256]
        old = held.get((j.key.split("_", 1)[0], j.phash, j.source))
        if old is None:
            jobs.append(j)
        else:  # a file rewritten (or finished growing) after it was ingested: one sample per source
            early.append(ClipResult(job=j, reject=Reject(kind=Kind.CHANGED, message=(
                f"the corpus holds other content of this source as {old}; not ingested twice (ingest the new "
                "version into a new --out, or rename it if it is another clip)"))))
    return jobs, early


def _results(jobs: list[Job], cfg: IngestConfig) -> Iterator[ClipResult]:
    """process_clip over jobs, in job order; with workers > 1 in supervised processes, where a
    worker that dies turns its clip into a reject."""
    from .workers import WorkerDied, imap_supervised

    fn = partial(process_clip, cfg=cfg)  # looked up now: tests may swap process_clip
    if cfg.workers == 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    for job, r in zip(jobs, imap_supervised(fn, jobs, cfg.workers, init=_init_worker, timeout=cfg.clip_timeout)):
        if isinstance(r, WorkerDied):
            r = ClipResult(job=job, reject=Reject(kind=Kind.TIMEOUT if r.timeout else Kind.WORKER, message=r.reason))
        yield r


class _Writer:
    """The single writer: one open shard per split, its stats, the rejects file."""

    def __init__(self, corpus: _Corpus, cfg: IngestConfig, report: IngestReport) -> None:
        self.corpus, self.cfg, self.report = corpus, cfg, report
        self.shards: dict[str, tuple[ShardWriter, CorpusStats]] = {}
        self.next_index = max((int(s["tar"][6:12]) for s in corpus.manifest["shards"]), default=-1) + 1
        self.rejects = None if cfg.dry_run else open(corpus.out_dir / REJECTS, "a")

    def take(self, r: ClipResult) -> None:
        rep, q = self.report, self.report.quality
        rep.input_bytes += r.job.size
        if r.reject is not None:
            rep.rejected += 1
            q.rejected[r.reject.kind] = q.rejected.get(r.reject.kind, 0) + 1
            self._reject(r)
            return
        rep.added += 1
        rep.frames += r.frames
        q.run.add(r.stats)
        q.splits[r.job.split] = q.splits.get(r.job.split, 0) + self.cfg.dry_run
        if not self.cfg.dry_run:
            self._add(r)

    def _reject(self, r: ClipResult) -> None:
        j = r.job
        self.report.rejected_files.append(rejected_file(j.clip.source, r.reject.kind, r.reject.message,
                                                        r.reject.transient, j.source))
        if self.rejects is None:
            return
        self.rejects.write(json.dumps({
            "source": j.source, "source_sha256": j.sha256 or None, "dataset": j.key.split("_", 1)[0] or None,
            "kind": r.reject.kind, "reason": r.reject.message, "transient": r.reject.transient,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        self.rejects.flush()

    def _add(self, r: ClipResult) -> None:
        j = r.job
        if j.split not in self.shards:
            self.shards[j.split] = (ShardWriter(out_dir=self.corpus.out_dir, index=self.next_index, split=j.split),
                                    CorpusStats())
            self.next_index += 1
        w, stats = self.shards[j.split]
        rec = SampleRecord(key=j.key, source=j.source, source_sha256=j.sha256, patient=j.phash, study=j.study,
                           split=j.split, frames=r.frames)
        try:
            w.add(j.key, r.components, rec)
        except BaseException:
            self.shards.pop(j.split)[0].abort()  # a half-written sample: drop the shard
            raise
        stats.add(r.stats)
        if w.bytes >= self.cfg.shard_size:
            self.finish(j.split)

    def finish(self, split: str) -> None:
        w, stats = self.shards.pop(split)
        entry = w.finalize()
        entry["stats"] = stats.to_dict()
        add_shard(self.corpus.manifest, entry)
        write_manifest(self.corpus.out_dir, self.corpus.manifest)
        self.report.shards.append(entry["tar"])
        self.report.output_bytes += entry["bytes"]

    def close(self) -> None:
        """Complete samples are kept on any exit (Ctrl-C included); kill -9 leaves only *.tmp
        files, which the next run removes."""
        for split in list(self.shards):
            if self.shards[split][0].samples:
                self.finish(split)
            else:
                self.shards.pop(split)[0].abort()
        if self.rejects is not None:
            self.rejects.close()


def ingest(sources: list[str | Path], out_dir: str | Path, cfg: IngestConfig | None = None) -> IngestReport:
    """Ingest every clip of `sources` into shards under `out_dir`; resumable and idempotent by
    content. With cfg.dry_run nothing is written; the report says what a run would do."""
    cfg = cfg or IngestConfig()
    cfg.validate()
    if cfg.size < 128:
        warnings.warn(f"ingest size {cfg.size} < 128: NVDEC (the GPU decoder) needs at least 128x128; "
                      "fine for CPU tests and demos only", stacklevel=2)
    out_dir = Path(out_dir)
    try:
        if cfg.dry_run:
            return _run(sources, out_dir, cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        with DirLock(out_dir):
            return _run(sources, out_dir, cfg)
    except OSError as e:  # a full disk, a read-only --out: the shards written so far stay valid
        where = os.fsdecode(e.filename) if e.filename else str(out_dir)
        raise DataError(f"{where}: {e.strerror or e} (ingest stopped; the complete shards so far are kept "
                        "and a rerun resumes)") from None


def _run(sources: list[str | Path], out_dir: Path, cfg: IngestConfig) -> IngestReport:
    from tqdm import tqdm

    from .sources import discover

    t0 = time.perf_counter()
    corpus = _open_corpus(out_dir, cfg)
    found = Discovery()
    for s in sources:
        found.extend(_keep_labels(discover(s, dataset=cfg.dataset), s, cfg))
    report = IngestReport(id_key=str(corpus.key_path), id_key_created=corpus.key_created)
    report.quality = QualityReport(dry_run=cfg.dry_run, unlisted=len(found.unlisted), renamed=len(found.renamed),
                                   ignored=dict(found.ignored))
    jobs, early = _select(found.clips, corpus, cfg, report)
    writer = _Writer(corpus, cfg, report)
    bar = tqdm(total=len(jobs) + len(early), unit="clip", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for r in itertools.chain(early, _results(jobs, cfg)):  # streamed: results hold encoded videos
            writer.take(r)
            bar.update(1)
            bar.set_postfix_str(f"{report.input_bytes / 2**20 / (time.perf_counter() - t0):.1f} MB/s, "
                                f"rejects {report.rejected}")
    finally:
        writer.close()
        bar.close()
        if not cfg.dry_run:
            write_log(out_dir, report.rejected_files)  # paths stay outside the shard folder
    report.seconds = time.perf_counter() - t0
    report.quality.added, report.quality.skipped = report.added, report.skipped
    _finish_quality(report.quality, corpus, cfg)
    return report


def _keep_labels(found: Discovery, source, cfg: IngestConfig) -> Discovery:
    """Only allowlisted labels reach the sample json (docs/shards.md#labels); a warning names
    the columns dropped, and those that look like identifiers are never written."""
    dropped, identifying = set(), set()
    for c in found.clips:
        c.labels, d, i = allowed_labels(c.labels, tuple(cfg.label_columns))
        dropped |= d
        identifying |= i
    if identifying:
        warnings.warn(f"{os.fsdecode(source)}: column(s) {', '.join(sorted(identifying))} look like patient "
                      "identifiers: not written into the shards", stacklevel=3)
    if dropped:
        warnings.warn(f"{os.fsdecode(source)}: column(s) {', '.join(sorted(dropped))} are not labels echofm "
                      "knows (docs/shards.md#labels): dropped; keep one with --label NAME", stacklevel=3)
    return found


def _finish_quality(q: QualityReport, corpus: _Corpus, cfg: IngestConfig) -> None:
    """Corpus figures from the manifest's shard stats (a dry run: the existing corpus plus what
    it would add); warnings; the JSON next to the manifest (not for a dry run)."""
    m = corpus.manifest
    for s in m["shards"]:
        if "stats" in s:
            q.corpus.merge(s["stats"])
        else:
            q.shards_without_stats += 1
    run_splits = dict(q.splits)
    q.splits = {s: m["splits"].get(s, 0) + run_splits.get(s, 0) for s in SPLITS}
    if cfg.dry_run:
        q.corpus.merge(q.run.to_dict())
    q.finish()
    if not cfg.dry_run:
        tmp = corpus.out_dir / (REPORT + ".tmp")
        tmp.write_text(json.dumps(q.to_dict(), indent=1) + "\n")
        os.replace(tmp, corpus.out_dir / REPORT)
