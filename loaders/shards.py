"""WebDataset shard files (DESIGN §2): tar writer with its DALI index, manifest, verify.

A shard directory holds `shard-NNNNNN.tar` (the samples), `shard-NNNNNN.idx` (DALI's
`wds2idx` v1.2 index, written from the offsets we know while writing, so no second pass),
`shard-NNNNNN.samples.jsonl` (one line per sample: key, source (a hash of the absolute
source path), source_sha256, patient (hash), split, frames; what resume and split checks read) and `manifest.json`.

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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass(kw_only=True, slots=True)
class SampleRecord:
    """One sample as the sidecar (and resume) sees it."""

    key: str
    source: str
    source_sha256: str
    patient: str
    split: str
    frames: int

    def to_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "source_sha256": self.source_sha256,
                "patient": self.patient, "split": self.split, "frames": self.frames}


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
        """Append one sample; components are (extension, bytes), e.g. ("webm", ...)."""
        if not KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} has characters outside [A-Za-z0-9_-]")
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
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(m, dict):
        raise DataError(f"{path}: manifest is not a JSON object")
    missing = [k for k in ("schema_version", "codec", "video_ext", "height", "width", "shards",
                           "splits", "total_frames") if k not in m]
    if missing:
        raise DataError(f"{path}: manifest lacks {', '.join(missing)}")
    if m["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {m['schema_version']}, this code reads {SCHEMA_VERSION}")
    return m


def read_sample_records(shard_dir: str | Path, manifest: dict) -> list[dict]:
    """All sidecar records of the shards listed in the manifest (resume, split checks)."""
    out = []
    for s in manifest["shards"]:
        path = Path(shard_dir) / s.get("samples_file", s["tar"].replace(".tar", ".samples.jsonl"))
        try:
            out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read shard sample list ({e})") from e
    return out


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


# ---------------------------------------------------------------- verify


@dataclass(kw_only=True, slots=True)
class VerifyReport:
    """Outcome of `verify`: totals and one line per problem ('shard key: what')."""

    shards: int = 0
    samples: int = 0
    frames: int = 0
    splits: dict = field(default_factory=dict)
    decoder: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.shards} shards, {self.samples} samples, {self.frames} frames, splits "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items()))
                + f"; videos decoded with {self.decoder}")
        tail = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return f"{head}: {tail}"


class _DaliDecoder:
    """DALI CPU `fn.decoders.video` (the stream's decoder) fed one encoded video at a time."""

    def __init__(self) -> None:
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def pipe():
            v = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
            return fn.decoders.video(v, device="cpu")

        p = pipe()
        p.build()
        return p

    def frames_shape(self, data: bytes) -> tuple[int, ...]:
        """Decoded shape (F, H, W, C); raises RuntimeError on a video DALI cannot decode."""
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("video", [np.frombuffer(data, np.uint8)])
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None  # a failed decode can leave the pipeline unusable: rebuild next time
            raise
        return tuple(out.as_array().shape[1:])


def _pyav_shape(data: bytes) -> tuple[int, ...]:
    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        n = sum(1 for _ in c.decode(st))
        return (n, st.codec_context.height, st.codec_context.width, 3)


def _dali_index_keys(tar: Path, idx: Path) -> list[str]:
    """Keys in the order DALI's webdataset reader yields them with this index (no decoding)."""
    from nvidia.dali import fn, pipeline_def, types

    n = len(read_index(idx))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        nf, meta = fn.readers.webdataset(paths=[str(tar)], index_paths=[str(idx)], ext=["nframes", "json"],
                                         dtypes=[types.INT32, types.UINT8],
                                         missing_component_behavior="error", name="reader")
        return nf, meta

    p = pipe()
    p.build()
    keys = []
    for _ in range(n):
        _, meta = p.run()
        keys.append(json.loads(bytes(np.asarray(meta[0]))).get("key", "?"))
    return keys


def verify(shard_dir: str | Path, *, decode: bool = True, progress: bool = False) -> VerifyReport:
    """Check a shard directory: manifest vs files (size, sha256, counts), the DALI index vs
    the tar, every sample's components and json, and (decode=True) that every video decodes
    with the stream's decoder to the frame count its json and `.nframes` say.

    vp9 / mjpeg decode with DALI's CPU `fn.decoders.video`; h264 has no DALI CPU decoder, so
    it is checked with PyAV (FFmpeg) on the CPU.
    """
    shard_dir = Path(shard_dir)
    m = read_manifest(shard_dir)
    rep = VerifyReport(decoder=("PyAV/FFmpeg (h264 cannot be checked with DALI on the CPU)"
                                if m["codec"] == "h264" else "DALI CPU fn.decoders.video")
                       if decode else "none (--no-decode)")
    dali = _DaliDecoder() if decode and m["codec"] != "h264" else None
    vext = m["video_ext"]
    seen_keys: dict[str, str] = {}
    patient_split: dict[str, str] = {}
    from tqdm import tqdm

    for s in tqdm(m["shards"], unit="shard", disable=not progress):
        name, tar, idx = s["tar"], shard_dir / s["tar"], shard_dir / s["idx"]
        bad = lambda msg, key=None: rep.problems.append(f"{name}{' ' + key if key else ''}: {msg}")  # noqa: E731
        rep.shards += 1
        if not tar.is_file() or not idx.is_file():
            bad(f"missing file {tar.name if not tar.is_file() else idx.name}")
            continue
        if tar.stat().st_size != s["bytes"]:
            bad(f"size {tar.stat().st_size} bytes, manifest says {s['bytes']}")
        if sha256_file(tar) != s["sha256"]:
            bad("sha256 differs from the manifest (file changed or damaged)")
        try:
            index = read_index(idx)
        except (OSError, ValueError) as e:
            bad(f"bad index {idx.name}: {e}")
            index = []
        try:
            with tarfile.open(tar, "r:") as tf:
                members = [mm for mm in tf.getmembers() if mm.isfile()]
            # what the index must say: per key (in tar order) its (ext, data offset, size, name)
            got: dict[str, list] = {}
            for mm in members:
                k, _, ext = mm.name.partition(".")
                got.setdefault(k, []).append((ext, mm.offset_data, mm.size, mm.name))
            got = list(got.values())
            if index and got != index:
                bad(f"index {idx.name} does not match the tar's members (offsets/sizes/order)")
            samples = list(iter_tar_samples(tar))
        except (tarfile.TarError, OSError) as e:
            bad(f"unreadable tar ({e})")
            continue
        if len(samples) != s["samples"]:
            bad(f"{len(samples)} samples, manifest says {s['samples']}")
        frames = 0
        for key, comp in samples:
            rep.samples += 1
            miss = [e for e in (vext, "json", "nframes") if e not in comp]
            if miss:
                bad(f"missing component(s) {', '.join(miss)}", key)
                continue
            if key in seen_keys:
                bad(f"duplicate key (also in {seen_keys[key]})", key)
            seen_keys[key] = name
            try:
                meta = json.loads(comp["json"])
                nf = unpack_nframes(comp["nframes"])
            except (ValueError, UnicodeDecodeError) as e:
                bad(f"bad json / nframes ({e})", key)
                continue
            frames += nf
            if meta.get("frames") != nf:
                bad(f"json frames {meta.get('frames')} != .nframes {nf}", key)
            if meta.get("split") != s["split"]:
                bad(f"json split {meta.get('split')!r} in a {s['split']!r} shard", key)
            pt = meta.get("patient")
            if pt is not None and patient_split.setdefault(pt, s["split"]) != s["split"]:
                bad(f"patient {pt} is in splits {patient_split[pt]!r} and {s['split']!r}", key)
            if "seg.npy" in comp:
                try:
                    seg = np.load(io.BytesIO(comp["seg.npy"]), allow_pickle=False)
                    if seg.dtype != np.uint8 or seg.shape != (nf, m["height"], m["width"]):
                        bad(f"seg.npy {seg.dtype} {seg.shape}, expected uint8 {(nf, m['height'], m['width'])}", key)
                except ValueError as e:
                    bad(f"unreadable seg.npy ({e})", key)
            if not decode:
                continue
            try:
                shape = dali.frames_shape(comp[vext]) if dali else _pyav_shape(comp[vext])
            except Exception as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                msg = next((ln for ln in lines if "ailed" in ln), lines[-1] if lines else type(e).__name__)
                bad(f"video does not decode ({msg})", key)
                continue
            if shape[0] != nf:
                bad(f"video decodes to {shape[0]} frames, .nframes/json say {nf}", key)
            if shape[1:3] != (m["height"], m["width"]):
                bad(f"video is {shape[1]}x{shape[2]}, manifest says {m['height']}x{m['width']}", key)
        rep.frames += frames
        if frames != s["frames"]:
            bad(f"{frames} frames in samples, manifest says {s['frames']}")
        rep.splits[s["split"]] = rep.splits.get(s["split"], 0) + len(samples)
        if decode and index and not any(p.startswith(name) for p in rep.problems):
            try:  # the DALI reader itself must walk the shard with this index
                keys = _dali_index_keys(tar, idx)
                if keys != [k for k, _ in samples]:
                    bad("DALI reader with this index yields other keys than the tar holds")
            except Exception as e:
                bad(f"DALI webdataset reader fails with {idx.name} ({str(e).splitlines()[0]})")
    return rep


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
