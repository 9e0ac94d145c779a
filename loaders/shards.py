"""WebDataset shard files (docs/shards.md): tar writer with its DALI index, manifest, lock;
`verify` (every sample against the manifest, sidecar and index) is shard_verify.py.

A shard directory holds `shard-NNNNNN.tar` (the samples), `shard-NNNNNN.idx` (DALI's
`wds2idx` v1.2 index, written from the offsets we know while writing, so no second pass),
`shard-NNNNNN.samples.jsonl` (one line per sample: key, source (the corpus-keyed HMAC of
the path relative to the source root: loaders/ids.py), source_sha256, patient (keyed hash),
split, frames; what resume and split checks read; member_sha256: the sha256 of each member,
so `verify` and the stream name a damaged sample) and `manifest.json`.

Crash safety: a shard is written under `*.tmp` names, fsynced and renamed; only then is the
manifest (the single source of truth) replaced atomically. A shard file that is not listed
in the manifest is a leftover of an interrupted run and is removed by `clean_orphans`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_RE = re.compile(r"^shard-(\d{6})\.(tar|idx|samples\.jsonl)(\.tmp)?$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def pack_nframes(n: int) -> bytes:
    """The `.nframes` component: int32 little-endian (DALI reads it with dtype INT32)."""
    return struct.pack("<i", int(n))


def unpack_nframes(b: bytes) -> int:
    if len(b) != 4:
        raise ValueError(f".nframes must be 4 bytes, got {len(b)}")
    return struct.unpack("<i", b)[0]


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(kw_only=True, slots=True)
class SampleRecord:
    """One sample as the sidecar (and resume) sees it."""

    key: str
    source: str
    source_sha256: str
    patient: str
    split: str
    frames: int
    study: str = ""
    """Keyed hash of the sample's study (exam); '' in sidecars of an older ingest."""
    member_sha256: dict[str, str] = field(default_factory=dict)
    """{extension: sha256 hex} of the sample's tar members; filled by `ShardWriter.add`."""

    def to_dict(self) -> dict:
        d = {"key": self.key, "source": self.source, "source_sha256": self.source_sha256,
             "patient": self.patient, "split": self.split, "frames": self.frames}
        if self.study:
            d["study"] = self.study
        if self.member_sha256:
            d["member_sha256"] = dict(self.member_sha256)
        return d


@dataclass(kw_only=True, slots=True)
class ShardWriter:
    """Writes one tar shard (samples of one split) plus its DALI index.

    Components of a sample are written consecutively in the order given, so the DALI
    index groups them under one key.
    """

    out_dir: Path
    index: int
    split: str
    samples: int = 0
    frames: int = 0
    has_seg: bool = False
    _f: io.BufferedWriter | None = None
    _hash: object = None
    _pos: int = 0
    _idx_lines: list[str] = field(default_factory=list)
    _records: list[SampleRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._f = open(self._path("tar", tmp=True), "wb")
        self._hash = hashlib.sha256()

    def _path(self, ext: str, tmp: bool = False) -> Path:
        return self.out_dir / (f"{shard_name(self.index)}.{ext}" + (".tmp" if tmp else ""))

    @property
    def bytes(self) -> int:
        return self._pos

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._hash.update(b)
        self._pos += len(b)

    def add(self, key: str, components: list[tuple[str, bytes]], record: SampleRecord) -> None:
        """Append one sample; components are (extension, bytes), e.g. ("webm", ...). Records
        each member's sha256 in `record.member_sha256` (the sidecar line)."""
        if not KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} has characters outside [A-Za-z0-9_-]")
        record.member_sha256 = {ext: hashlib.sha256(data).hexdigest() for ext, data in components}
        parts = []
        for ext, data in components:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            header = info.tobuf(format=tarfile.GNU_FORMAT)
            self._write(header)
            parts.append(f"{ext} {self._pos} {len(data)} {name}")
            self._write(data)
            pad = (-len(data)) % tarfile.BLOCKSIZE
            if pad:
                self._write(b"\0" * pad)
            if ext == "seg.npy":
                self.has_seg = True
        self._idx_lines.append(" ".join(parts))
        self._records.append(record)
        self.samples += 1
        self.frames += record.frames

    def finalize(self) -> dict:
        """Close the tar, write index + sidecar, rename all into place; returns the manifest entry.

        The manifest is not touched here: the caller adds the entry and writes the manifest.
        """
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        idx = f"v1.2 {self.samples}\n" + "\n".join(self._idx_lines) + "\n"
        _fsync_write(self._path("idx", tmp=True), idx.encode())
        side = "".join(json.dumps(r.to_dict()) + "\n" for r in self._records)
        _fsync_write(self._path("samples.jsonl", tmp=True), side.encode())
        for ext in ("idx", "samples.jsonl", "tar"):
            os.replace(self._path(ext, tmp=True), self._path(ext))
        _fsync_dir(self.out_dir)
        name = shard_name(self.index)
        return {"tar": f"{name}.tar", "idx": f"{name}.idx", "samples_file": f"{name}.samples.jsonl",
                "split": self.split, "samples": self.samples, "frames": self.frames,
                "bytes": self._pos, "sha256": self._hash.hexdigest(), "has_seg": self.has_seg}

    def abort(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()
        self._path("tar", tmp=True).unlink(missing_ok=True)


# ---------------------------------------------------------------- manifest


def new_manifest(*, codec: str, video_ext: str, height: int, width: int, settings: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "codec": codec, "video_ext": video_ext,
            "height": height, "width": width, "shards": [], "splits": {}, "total_samples": 0,
            "total_frames": 0, "settings": settings}


def add_shard(manifest: dict, entry: dict) -> None:
    """Add a finalized shard's entry and update the totals."""
    manifest["shards"].append(entry)
    manifest["splits"][entry["split"]] = manifest["splits"].get(entry["split"], 0) + entry["samples"]
    manifest["total_samples"] = manifest.get("total_samples", 0) + entry["samples"]
    manifest["total_frames"] += entry["frames"]


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    """Atomically replace manifest.json (temp file, fsync, os.replace, fsync dir)."""
    out_dir = Path(out_dir)
    tmp = out_dir / (MANIFEST + ".tmp")
    _fsync_write(tmp, (json.dumps(manifest, indent=1) + "\n").encode())
    os.replace(tmp, out_dir / MANIFEST)
    _fsync_dir(out_dir)


def read_manifest(shard_dir: str | Path) -> dict:
    """Read `<shard_dir>/manifest.json`; raises DataError naming the file when missing or bad."""
    path = Path(shard_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (is this a shard directory written by `echofm ingest`?)") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise DataError(f"{path}: unreadable manifest ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(m, dict):
        raise DataError(f"{path}: manifest is not a JSON object")
    missing = [k for k in ("schema_version", "codec", "video_ext", "height", "width", "shards",
                           "splits", "total_frames") if k not in m]
    if missing:
        raise DataError(f"{path}: manifest lacks {', '.join(missing)}")
    if m["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {m['schema_version']}, this code reads {SCHEMA_VERSION}")
    _check_manifest(m, path)
    return m


_MANIFEST_TYPES = {"codec": str, "video_ext": str, "height": int, "width": int, "shards": list,
                   "splits": dict, "total_frames": int}
_SHARD_TYPES = {"tar": str, "idx": str, "split": str, "samples": int, "frames": int, "bytes": int,
                "sha256": str}


def _check_manifest(m: dict, path: Path) -> None:
    """Types of the fields readers use, so a damaged manifest is one named error, not a
    KeyError or TypeError deep inside a reader."""
    def kind(v, tp) -> bool:
        return isinstance(v, tp) and not (tp is int and isinstance(v, bool))

    for k, tp in _MANIFEST_TYPES.items():
        if not kind(m[k], tp):
            raise DataError(f"{path}: field {k!r} is {type(m[k]).__name__} {m[k]!r:.60}, expected "
                            f"{tp.__name__} (damaged manifest; re-ingest, or restore it from a backup)")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict):
            raise DataError(f"{path}: shards[{i}] is {type(s).__name__}, expected an object (damaged manifest)")
        for k, tp in _SHARD_TYPES.items():
            if k not in s:
                raise DataError(f"{path}: shards[{i}] lacks {k!r} (damaged manifest)")
            if not kind(s[k], tp):
                raise DataError(f"{path}: shards[{i}].{k} is {type(s[k]).__name__} {s[k]!r:.60}, expected "
                                f"{tp.__name__} (damaged manifest)")
        if "/" in s["tar"] or "/" in s["idx"] or s["tar"].startswith(".."):
            raise DataError(f"{path}: shards[{i}] names a file outside the shard folder ({s['tar']!r})")


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of the manifest's bytes: changes whenever shards are added or replaced (it lists
    every shard's sha256), so it keys caches of anything computed from the shards."""
    path = Path(shard_dir) / MANIFEST
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror})") from None


def read_sample_records(shard_dir: str | Path, manifest: dict) -> list[dict]:
    """All sidecar records of the shards listed in the manifest (resume, split checks)."""
    out = []
    for s in manifest["shards"]:
        path = Path(shard_dir) / s.get("samples_file", s["tar"].replace(".tar", ".samples.jsonl"))
        out += _read_sidecar(path)
    return out


def _read_sidecar(path: Path) -> list[dict]:
    """The records of one `*.samples.jsonl`; DataError naming the file and line when damaged."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as e:  # ValueError: bytes that are not UTF-8
        raise DataError(f"{path}: cannot read shard sample list ({str(e).splitlines()[0][:120]})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e}); the sample list is damaged") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or "source" not in rec:
            raise DataError(f"{path}: line {n} is not a sample record (needs key and source)")
        out.append(rec)
    return out


def read_member_hashes(shard_dir: str | Path, shard: dict) -> dict[str, dict[str, str]]:
    """{key: {extension: sha256}} recorded at ingest for one manifest shard entry; {} for
    shards written before member hashes existed (or without a sample list)."""
    path = Path(shard_dir) / shard.get("samples_file", shard["tar"].replace(".tar", ".samples.jsonl"))
    if not path.is_file():
        return {}
    return {r["key"]: r["member_sha256"] for r in _read_sidecar(path) if isinstance(r.get("member_sha256"), dict)}


def clean_orphans(shard_dir: str | Path, manifest: dict | None) -> list[str]:
    """Remove shard files (and temp files) that the manifest does not list: the leftovers of an
    interrupted run. Returns the removed names."""
    shard_dir = Path(shard_dir)
    listed = set()
    for s in (manifest or {}).get("shards", []):
        listed |= {s["tar"], s["idx"], s.get("samples_file", "")}
    removed = []
    for p in shard_dir.iterdir():
        if (SHARD_RE.match(p.name) and p.name not in listed) or p.name == MANIFEST + ".tmp":
            p.unlink()
            removed.append(p.name)
    return sorted(removed)


def read_index(path: str | Path) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI v1.2 index: per sample a list of (ext, offset, size, name)."""
    lines = Path(path).read_text().splitlines()
    head = lines[0].split()
    if len(head) != 2 or head[0] != "v1.2":
        raise ValueError(f"not a v1.2 index header: {lines[0]!r}")
    out = []
    for line in lines[1:]:
        t = line.split()
        if len(t) % 4:
            raise ValueError(f"bad index line {line!r}")
        out.append([(t[i], int(t[i + 1]), int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)])
    if len(out) != int(head[1]):
        raise ValueError(f"index header says {head[1]} samples, has {len(out)}")
    return out


def iter_tar_samples(path: str | Path):
    """Yield (key, {ext: bytes}) for consecutive members sharing a key (WebDataset grouping)."""
    key, comp = None, {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, comp
                comp = {}
            key = k
            comp[ext] = tf.extractfile(m).read()
    if key is not None:
        yield key, comp


# ---------------------------------------------------------------- lock


LOCK = ".ingest.lock"


class DirLock:
    """An exclusive lock on a shard directory (fcntl.flock on `<dir>/.ingest.lock`), held
    while an ingest writes there. The file says who holds it (pid, host, start time), so a
    second ingest can say so; the kernel drops the lock when its holder dies (kill -9
    included), so it is never stale. Use as a context manager.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> "DirLock":
        import fcntl
        import socket
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                who = {}
            os.close(fd)
            raise DataError(f"{self.path.parent}: another ingest is writing here (pid {who.get('pid', '?')} on "
                            f"{who.get('host', '?')}, since {who.get('started', '?')}); wait for it or use "
                            "another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
