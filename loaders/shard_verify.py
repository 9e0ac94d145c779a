"""`echofm shards verify`: check every sample of a shard directory against what ingest recorded
(manifest, sidecar sha256s, DALI index, frame counts; optionally a decode), naming each damaged
sample with a typed `Problem` (docs/shards.md). The format itself is shards.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .digest import sha256_file
from .errors import DataError
from .pipeline import decoder_reason

from .shards import iter_tar_samples, read_index, read_manifest, read_member_hashes, unpack_nframes


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
