"""Ingest's work on one clip, in a worker process (`process_clip`: Job -> ClipResult): decode
frame by frame through resize, reject damaged decodes, crop to the fan, measure the cycle,
re-time, encode, count the frames back. ingest.py plans the jobs and writes the results.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import DataError
from .fold import fold_frames
from .ingest_config import ClipResult, IngestConfig, Job, Kind, Reject
from .quality import ClipStats
from .shards import npy_bytes, pack_nframes
from .sources.base import Clip
from .video_io import CODECS


GROWING = "source changed while it was read (still being written?); retried by the next run"


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Same size and mtime: what was hashed is what is decoded (a growing file changes both)."""
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


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
    if job.mtime_ns is not None and not (same_file(before, after) and (before.st_size, before.st_mtime_ns) == (job.size, job.mtime_ns)):
        return Reject(kind=Kind.GROWING, message=GROWING)
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


def init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one clip per process; the pool supplies the parallelism
