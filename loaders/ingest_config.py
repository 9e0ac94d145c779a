"""What ingest (ingest.py) is told and what it passes around: its settings (`IngestConfig`), the
job it hands a worker and the answer it gets back (`Job`, `ClipResult`, `Reject` with a `Kind`),
and what a run reports (`IngestReport`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


from . import ids
from .quality import ClipStats, QualityReport
from .reject_log import RejectedFile
from .sources.base import Clip, looks_identifying
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
