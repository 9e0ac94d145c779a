"""WebDataset shard files (DESIGN §2): tar writer with its DALI index, manifest, verify.

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
from typing import Literal

import numpy as np

from .errors import DataError
from .pipeline import decoder_reason

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


# ---------------------------------------------------------------- verify


ProblemKind = Literal["missing_file", "shard_size", "shard_sha256", "index", "tar", "member_hashes",
                      "sample_count", "frame_total", "dali_reader", "component", "member_sha256",
                      "duplicate_key", "json", "split", "patient_split", "seg", "undecodable",
                      "frame_count", "frame_size"]
"""What a verify problem is about: the shard file as a whole (missing_file ... dali_reader)
or one sample (component ... frame_size)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of `verify`."""

    shard: str
    """The shard's tar file name."""
    key: str | None
    """The sample key; None for the shard as a whole."""
    kind: ProblemKind
    detail: str
    """What is wrong, in words (with the decoder's own message for undecodable videos)."""

    def __str__(self) -> str:
        return f"{self.shard}{' ' + self.key if self.key else ''}: {self.detail}"


@dataclass(kw_only=True, slots=True)
class VerifyReport:
    """Outcome of `verify`: totals and every problem found (str(problem): 'shard key: what')."""

    shards: int = 0
    samples: int = 0
    frames: int = 0
    splits: dict = field(default_factory=dict)
    decoder: str = ""
    problems: list[Problem] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    """Keys of samples whose members have no sha256 recorded (an older ingest): their bytes
    cannot be checked for damage (only decoded)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.shards} shards, {self.samples} samples, {self.frames} frames, splits "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items()))
                + f"; videos decoded with {self.decoder}")
        tail = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        if self.unchecked:
            tail += (f"; WARNING: {len(self.unchecked)} sample(s) record no member sha256, their bytes cannot be "
                     f"checked (e.g. {self.unchecked[0]}; re-ingest to record them)")
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


@dataclass(kw_only=True, slots=True)
class _Seen:
    """What `verify` remembers across shards: keys and each patient's split."""

    keys: dict[str, str] = field(default_factory=dict)
    patient_split: dict[str, str] = field(default_factory=dict)


def verify(shard_dir: str | Path, *, decode: bool = True, progress: bool = False) -> VerifyReport:
    """Check a shard directory: manifest vs files (size, sha256, counts), the DALI index vs
    the tar, every sample's members against the sha256s recorded at ingest (naming each
    damaged sample), its json, and (decode=True) that every video decodes with the stream's
    decoder to the frame count its json and `.nframes` say.

    vp9 / mjpeg decode with DALI's CPU `fn.decoders.video`; h264 has no DALI CPU decoder, so
    it is checked with PyAV (FFmpeg) on the CPU. A tar that cannot be walked (e.g. truncated)
    is read sample by sample at its index's offsets, so the damaged samples are still named.
    """
    from tqdm import tqdm

    shard_dir = Path(shard_dir)
    m = read_manifest(shard_dir)
    rep = VerifyReport(decoder=("PyAV/FFmpeg (h264 cannot be checked with DALI on the CPU)"
                                if m["codec"] == "h264" else "DALI CPU fn.decoders.video")
                       if decode else "none (--no-decode)")
    dali = _DaliDecoder() if decode and m["codec"] != "h264" else None
    seen = _Seen()
    for s in tqdm(m["shards"], unit="shard", disable=not progress):
        _verify_shard(shard_dir, s, m, rep, seen, decode, dali)
    return rep


def _verify_shard(shard_dir: Path, s: dict, m: dict, rep: VerifyReport, seen: _Seen, decode: bool,
                  dali: _DaliDecoder | None) -> None:
    name, tar, idx = s["tar"], shard_dir / s["tar"], shard_dir / s["idx"]

    def bad(kind: ProblemKind, detail: str, key: str | None = None) -> None:
        rep.problems.append(Problem(shard=name, key=key, kind=kind, detail=detail))

    rep.shards += 1
    if not tar.is_file() or not idx.is_file():
        bad("missing_file", f"missing file {tar.name if not tar.is_file() else idx.name}")
        return
    n_problems = len(rep.problems)
    if tar.stat().st_size != s["bytes"]:
        bad("shard_size", f"size {tar.stat().st_size} bytes, manifest says {s['bytes']}")
    shard_changed = sha256_file(tar) != s["sha256"]
    try:
        index = read_index(idx)
    except (OSError, ValueError) as e:
        bad("index", f"bad index {idx.name}: {e}")
        index = []
    try:
        hashes = read_member_hashes(shard_dir, s)
    except DataError as e:
        bad("member_hashes", str(e))
        hashes = {}
    samples = _tar_samples(tar, index, bad)
    listed = list(dict.fromkeys([c[0][3].partition(".")[0] for c in index if c] + list(hashes)))
    got = {k for k, _ in samples or []}
    for k in listed:  # a tar cut at a member boundary just ends early: name what it lost
        if k not in got:
            bad("component", "not in the tar (truncated or removed); the index or sample list names it", k)
    if samples is None:
        return
    if len(samples) != s["samples"]:
        bad("sample_count", f"{len(samples)} samples, manifest says {s['samples']}")
    members_bad = 0
    frames = 0
    for key, comp in samples:
        rep.samples += 1
        if not hashes.get(key):
            rep.unchecked.append(key)
        damaged = [e for e, h in hashes.get(key, {}).items()
                   if comp.get(e) is not None and hashlib.sha256(comp[e]).hexdigest() != h]
        for e in damaged:
            bad("member_sha256", f".{e} differs from the sha256 recorded at ingest (damaged after ingest)", key)
        members_bad += len(damaged) + sum(v is None for v in comp.values())  # None: truncated
        frames += _verify_sample(key, comp, s, m, seen, bad, decode, dali)
    if shard_changed:
        bad("shard_sha256", "sha256 differs from the manifest (file changed or damaged)"
            + ("" if members_bad or not hashes else "; every sample's members match their own "
               "sha256, so the damage is in tar headers or padding"))
    rep.frames += frames
    if frames != s["frames"]:
        bad("frame_total", f"{frames} frames in samples, manifest says {s['frames']}")
    rep.splits[s["split"]] = rep.splits.get(s["split"], 0) + len(samples)
    if decode and index and len(rep.problems) == n_problems:
        try:  # the DALI reader itself must walk the shard with this index
            keys = _dali_index_keys(tar, idx)
            if keys != [k for k, _ in samples]:
                bad("dali_reader", "DALI reader with this index yields other keys than the tar holds")
        except Exception as e:
            bad("dali_reader", f"DALI webdataset reader fails with {idx.name} ({str(e).splitlines()[0]})")


def _tar_samples(tar: Path, index: list, bad) -> list[tuple[str, dict]] | None:
    """[(key, {ext: bytes})] of a shard. The tar's own walk must match the index; when the
    tar cannot be walked, the members are read at the index's offsets instead (a member
    the file does not hold whole is None). None when neither works."""
    try:
        with tarfile.open(tar, "r:") as tf:
            members = [mm for mm in tf.getmembers() if mm.isfile()]
        # what the index must say: per key (in tar order) its (ext, data offset, size, name)
        got: dict[str, list] = {}
        for mm in members:
            k, _, ext = mm.name.partition(".")
            got.setdefault(k, []).append((ext, mm.offset_data, mm.size, mm.name))
        if index and list(got.values()) != index:
            bad("index", f"index {tar.with_suffix('.idx').name} does not match the tar's members (offsets/sizes/order)")
        return list(iter_tar_samples(tar))
    except (tarfile.TarError, OSError) as e:
        if not index:
            bad("tar", f"unreadable tar ({e})")
            return None
        bad("tar", f"unreadable tar ({e}); its samples were read at the index's offsets")
    out = []
    with open(tar, "rb") as f:
        for comps in index:
            data = {}
            for ext, off, size, _ in comps:
                b = os.pread(f.fileno(), size, off)
                data[ext] = b if len(b) == size else None
            out.append((comps[0][3].partition(".")[0], data))
    return out


def _verify_sample(key: str, comp: dict, s: dict, m: dict, seen: _Seen, bad, decode: bool,
                   dali: _DaliDecoder | None) -> int:
    """Check one sample's components and json (and decode its video); returns its frame count."""
    vext = m["video_ext"]
    miss = [e for e in (vext, "json", "nframes") if comp.get(e) is None]
    if miss:
        bad("component", f"missing or truncated component(s) {', '.join(miss)}", key)
        return 0
    if key in seen.keys:
        bad("duplicate_key", f"duplicate key (also in {seen.keys[key]})", key)
    seen.keys[key] = s["tar"]
    try:
        meta = json.loads(comp["json"])
        nf = unpack_nframes(comp["nframes"])
    except (ValueError, UnicodeDecodeError) as e:
        bad("json", f"bad json / nframes ({e})", key)
        return 0
    if not isinstance(meta, dict):
        bad("json", "json is not an object", key)
        return nf
    if meta.get("frames") != nf:
        bad("frame_count", f"json frames {meta.get('frames')} != .nframes {nf}", key)
    if meta.get("split") != s["split"]:
        bad("split", f"json split {meta.get('split')!r} in a {s['split']!r} shard", key)
    pt = meta.get("patient")
    if pt is not None and seen.patient_split.setdefault(pt, s["split"]) != s["split"]:
        bad("patient_split", f"patient {pt} is in splits {seen.patient_split[pt]!r} and {s['split']!r}", key)
    if comp.get("seg.npy") is not None:
        try:
            seg = np.load(io.BytesIO(comp["seg.npy"]), allow_pickle=False)
            if seg.dtype != np.uint8 or seg.shape != (nf, m["height"], m["width"]):
                bad("seg", f"seg.npy {seg.dtype} {seg.shape}, expected uint8 {(nf, m['height'], m['width'])}", key)
        except ValueError as e:
            bad("seg", f"unreadable seg.npy ({e})", key)
    if decode:
        _verify_decode(key, comp[vext], nf, m, bad, dali)
    return nf


def _verify_decode(key: str, video: bytes, nf: int, m: dict, bad, dali: _DaliDecoder | None) -> None:
    try:
        shape = dali.frames_shape(video) if dali else _pyav_shape(video)
    except Exception as e:
        bad("undecodable", f"video does not decode ({decoder_reason(e)})", key)
        return
    if shape[0] != nf:
        bad("frame_count", f"video decodes to {shape[0]} frames, .nframes/json say {nf}", key)
    if shape[1:3] != (m["height"], m["width"]):
        bad("frame_size", f"video is {shape[1]}x{shape[2]}, manifest says {m['height']}x{m['width']}", key)


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
