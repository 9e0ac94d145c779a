"""Cut a WebM (VP8/VP9) video down to the GOPs one clip needs, as an IVF stream, without decoding.

Why: DALI 2.4's CPU video decoder decodes every frame from the start of the stream up to
the first requested one (measured at 224^2 VP9: frame 80 of 84 costs 19 ms, frame 0 1.3 ms),
so a random-start clip late in a video pays for the whole video. Handing the decoder only
the packets from the keyframe at or before the clip's first frame to its last frame makes
the cost proportional to the clip (ingest writes GOP <= 8). Decoding the cut stream gives
bit-identical frames (a VP9 keyframe resets all decoder state).

The scan is a flat walk over Matroska elements (EBML ids and sizes only): Segment, Cluster
and BlockGroup are entered, SimpleBlock/Block payloads become frames, everything else is
skipped by its size. ~0.1 ms for a 100-frame clip in Python.
"""
from __future__ import annotations

import struct

import numpy as np

_ENTER = {0x18538067, 0x1F43B675, 0xA0}  # Segment, Cluster, BlockGroup
_SIMPLE_BLOCK, _BLOCK, _REFERENCE_BLOCK = 0xA3, 0xA1, 0xFB
_FOURCC = {"vp9": b"VP90", "vp8": b"VP80"}


class NotCuttable(ValueError):
    """The stream is not a plain one-frame-per-block WebM; feed it whole instead."""


_VINT_LEN = bytes([0] + [9 - b.bit_length() for b in range(1, 256)])
"""Byte length of an EBML variable-length integer by its first byte (0: not a valid first byte)."""
_VINT_MASK = [0] + [(1 << (7 * m)) - 1 for m in range(1, 9)]
"""The value bits of an m-byte EBML size; all ones means "unknown size"."""


def scan_frames(data: bytes) -> np.ndarray:
    """Frames of a WebM in stream order -> int64 [F, 3]: (payload offset, size, is_keyframe).

    The loop is the stream's per-clip host work (~60 elements a clip), hence the table
    lookups and the one-byte fast paths instead of helper calls."""
    out: list[list[int]] = []
    pos, end = 0, len(data)
    from_bytes, vlen, masks = int.from_bytes, _VINT_LEN, _VINT_MASK
    try:
        while pos < end:
            first = data[pos]
            n = vlen[first]  # element id (keeps its marker bit)
            if n == 1:
                eid = first
            elif n:
                eid = from_bytes(data[pos:pos + n], "big")
            else:
                raise NotCuttable(f"bad EBML length byte at {pos}")
            pos += n
            first = data[pos]
            m = vlen[first]  # element size (marker bit cleared)
            if not m:
                raise NotCuttable(f"bad EBML length byte at {pos}")
            size = (first if m == 1 else from_bytes(data[pos:pos + m], "big")) & masks[m]
            body = pos + m
            if eid in _ENTER:
                pos = body  # walk into the element (also works for unknown sizes)
                continue
            if size == masks[m]:
                raise NotCuttable(f"element {eid:#x} of unknown size")
            if eid == _SIMPLE_BLOCK or eid == _BLOCK:
                tn = vlen[data[body]]  # track number, then int16 timecode, flags
                if not tn:
                    raise NotCuttable(f"bad EBML length byte at {body}")
                flags = data[body + tn + 2]
                if flags & 0x06:
                    raise NotCuttable("laced blocks")
                head = tn + 3
                out.append([body + head, size - head, 1 if (eid == _BLOCK or flags & 0x80) else 0])
            elif eid == _REFERENCE_BLOCK and out:
                out[-1][2] = 0  # a Block that references another one is not a keyframe
            pos = body + size
    except IndexError:
        raise NotCuttable("truncated stream") from None
    if pos != end or not out or not out[0][2]:
        raise NotCuttable("stream does not start with a keyframe or has trailing bytes")
    return np.asarray(out, dtype=np.int64)


def clip_runs(frames: np.ndarray, idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The decode plan of one clip's frames `idx` (int [T], any order): `idx` cut where it
    steps back (a clip wrapping around a short video) into increasing runs, each with the
    keyframe at or before its first frame -> [(keyframe, int64 run)]. Decoding each run from
    its keyframe gives bit-identical frames (a VP8/VP9 keyframe resets the decoder) and
    decodes each pass over the video once. `frames` is `scan_frames(data)`."""
    idx = np.asarray(idx, dtype=np.int64)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) < 0) + 1)
    keys = np.flatnonzero(frames[:, 2])
    return [(int(keys[np.searchsorted(keys, r[0], side="right") - 1]), r) for r in runs]


def cut_clip(data: bytes, frames: np.ndarray, idx: np.ndarray, codec: str, height: int,
             width: int) -> tuple[bytes, np.ndarray]:
    """IVF stream for one clip's frames `idx` (int [T], any order) -> (bytes, int64 [T] indices
    of the clip's frames in it).

    Each run of `clip_runs` becomes the frames from its keyframe to its last frame, and the
    runs are laid end to end: the indices into the cut stream increase, so the decoder never
    seeks back, and a wrapped clip decodes each run once instead of the video from frame 0
    once per run. `frames` is `scan_frames(data)`.
    """
    spans, local, base = [], [], 0
    for k0, r in clip_runs(frames, idx):
        spans.append(frames[k0:int(r[-1]) + 1])
        local.append(r - k0 + base)
        base += int(r[-1]) + 1 - k0
    sel = np.concatenate(spans)
    parts = [b"DKIF", struct.pack("<HH4sHHIIII", 0, 32, _FOURCC[codec], width, height, 30, 1, len(sel), 0)]
    view = memoryview(data)
    for i, (off, size, _) in enumerate(sel.tolist()):
        parts.append(struct.pack("<IQ", size, i))
        parts.append(view[off:off + size])
    return b"".join(parts), np.concatenate(local)
