"""Decode clips on the host: the CPU backend's decoder (`data.cpu_decoder: host`, docs/data.md).

Why not DALI's CPU video decoder: it converts every frame it decodes to RGB, and at 224^2
that conversion costs about as much as the decoding (VP9 with FFmpeg: 0.36 ms to decode a
frame, 0.37 ms to convert it with swscale; DALI's clip costs 11.1 CPU-ms against 7.8 here,
benchmarks/results/loader.json). Echo is grey, and ingest stores grey clips with neutral
chroma, so the luma plane is the whole picture: this module decodes with libavcodec
(through PyAV, one thread per clip, the GIL released while decoding) and keeps the Y plane,
mapped to full range exactly as swscale's grey output (`video_io.luma`). A clip with colour
on any frame (chroma off neutral) comes back as RGB instead. DALI then crops, resizes and
flips: the same graph as the GPU backend's, minus its decoder node.

What is decoded (and counted as decoded, for the decode-waste figure): a WebM the stream
could scan (the shards' VP8/VP9) is decoded in ascending frame order, jumping to a keyframe
whenever that skips frames (`decode_spans`), so every needed frame is decoded once, also
when a clip wraps around a short video; an all-intra MJPEG video decodes only the frames
the clip uses; anything else is decoded from its first frame up to the clip's last one.
"""
from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .video_io import LIMITED_TO_FULL, luma, neutral_chroma

INTRA_ONLY = ("mjpeg",)
"""Codecs whose every frame is a keyframe: a frame decodes without the ones before it."""


class DecodeFailed(ValueError):
    """The video (or the part the clip needs) cannot be decoded; the message says why."""


def decode_clip(video: bytes, table: np.ndarray | None, idx: np.ndarray, codec: str,
                size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The clip's frames `idx` (int [T], any order, repeats allowed) of one encoded video.

    table: the WebM's frame table (`trim.scan_frames`, int64 [F, 3]) when the stream could
    scan it, else None (the container is demuxed). size: (height, width) the manifest
    promises. -> (uint8 [T, H, W, 1] luma when every decoded clip frame is grey, else uint8
    [T, H, W, 3] RGB; frames the decoder produced). Raises DecodeFailed.
    """
    import av

    idx = np.asarray(idx, dtype=np.int64)
    frames = _Frames(size)
    try:
        if table is not None:
            decoded = _decode_runs(video, table, idx, codec, frames)
        else:
            decoded = _decode_container(video, idx, codec, frames)
    except (av.FFmpegError, ValueError, IndexError) as e:
        if isinstance(e, DecodeFailed):
            raise
        raise DecodeFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}") from None
    missing = sorted(set(idx.tolist()) - set(frames.got))
    if missing:
        raise DecodeFailed(f"the decoder produced no frame {missing[0]} (it stopped after {decoded} frames)")
    return frames.stack(idx), decoded


_FULL_RANGE = np.arange(256, dtype=np.uint8)


def grey_luma(frame) -> np.ndarray | None:
    """uint8 [H, W, 1]: the full-range luma of a grey frame (`video_io.luma`, exactly), or None
    when its chroma is not neutral (`video_io.neutral_chroma`). 8-bit 4:2:0 (what the shards
    hold) takes one compiled call (grey_kernels.py), other formats the numpy functions."""
    name = frame.format.name
    if name == "yuvj420p" or (name == "yuv420p" and frame.color_range != 2):  # 2: JPEG range flagged
        from .grey_kernels import luma_if_neutral

        yp, up, vp = frame.planes
        if up.line_size == vp.line_size:
            out = np.empty((frame.height, frame.width, 1), np.uint8)
            ok = luma_if_neutral(np.frombuffer(yp, np.uint8), yp.line_size, np.frombuffer(up, np.uint8),
                                 np.frombuffer(vp, np.uint8), up.line_size, up.height, up.width,
                                 _FULL_RANGE if name == "yuvj420p" else LIMITED_TO_FULL, out[..., 0])
            return out if ok else None
    return luma(frame)[..., None] if neutral_chroma(frame) else None


class _Frames:
    """The clip's decoded frames by index: luma while every frame is grey, RGB once one is not."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size, self.grey = size, True
        self.got: dict[int, np.ndarray] = {}

    def add(self, k: int, frame) -> None:
        if (frame.height, frame.width) != self.size:
            raise DecodeFailed(f"frame {k} is {frame.width}x{frame.height}, the manifest says "
                               f"{self.size[1]}x{self.size[0]}")
        if self.grey:
            y = grey_luma(frame)
            if y is not None:
                self.got[k] = y
                return
            self.grey = False  # the first colour frame: the grey ones so far become RGB too (R = G = B)
            self.got = {j: np.repeat(g, 3, axis=-1) for j, g in self.got.items()}
        self.got[k] = frame.to_ndarray(format="rgb24")

    def stack(self, idx: np.ndarray) -> np.ndarray:
        return np.stack([self.got[k] for k in idx.tolist()])


def decode_spans(table: np.ndarray, idx: np.ndarray) -> list[tuple[int, int]]:
    """The fewest frames to decode for frames `idx` of a video with frame table `table`
    (`trim.scan_frames`: column 2 marks keyframes) -> ascending [(first, last)] spans, each
    starting at a keyframe. Going up through the needed frames, a span continues to the next
    one unless a keyframe after the span's end lets the decoder skip the frames in between."""
    keys = np.flatnonzero(table[:, 2])
    spans: list[list[int]] = []
    for f in np.unique(idx).tolist():
        k = int(keys[np.searchsorted(keys, f, side="right") - 1])
        if spans and k <= spans[-1][1] + 1:
            spans[-1][1] = f
        else:
            spans.append([k, f])
    return [(a, b) for a, b in spans]


def _decode_runs(video: bytes, table: np.ndarray, idx: np.ndarray, codec: str, out: _Frames) -> int:
    """Feed the packets of each span (`decode_spans`) from the frame table straight to the
    codec: no container, no IVF copy. A span starts at a keyframe, which resets a VP8/VP9
    decoder, so one codec context serves the whole clip."""
    import av

    ctx = av.CodecContext.create(codec, "r")
    ctx.thread_count = 1  # parallelism is across clips (the stream's threads)
    view, decoded, want, rows = memoryview(video), 0, set(idx.tolist()), table.tolist()
    for first, last in decode_spans(table, idx):
        for k in range(first, last + 1):
            off, n, _ = rows[k]
            frame = _one_frame(k, ctx.decode(av.Packet(bytes(view[off:off + n]))))
            decoded += 1
            if k in want:
                out.add(k, frame)
    return decoded


def _decode_container(video: bytes, idx: np.ndarray, codec: str, out: _Frames) -> int:
    """Demux the whole video; decode only the needed frames of an intra-only codec, else every
    frame up to the clip's last one."""
    import av

    want, last, decoded = set(idx.tolist()), int(idx.max()), 0
    with av.open(io.BytesIO(video), mode="r") as c:
        st = c.streams.video[0]
        st.codec_context.thread_count = 1
        for k, packet in enumerate(c.demux(st)):
            if k > last or packet.size == 0:  # (the demuxer ends with an empty flush packet)
                break
            if codec in INTRA_ONLY and k not in want:
                continue
            frame = _one_frame(k, packet.decode())
            decoded += 1
            if k in want:
                out.add(k, frame)
    return decoded


def _one_frame(k: int, got: list):
    """The one frame packet k decoded to (no frame delay: one thread, no B-frames / alt-refs)."""
    if len(got) != 1:
        raise DecodeFailed(f"packet {k} gave {len(got)} frames (one frame per packet expected)")
    return got[0]


class HostDecoder:
    """A pool of `threads` threads that decode clips (`decode_clip`) ahead of DALI."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="echofm-decode")

    def submit(self, video: bytes, table: np.ndarray | None, idx: np.ndarray, codec: str,
               size: tuple[int, int]) -> Future:
        return self._pool.submit(decode_clip, video, table, idx, codec, size)

    def close(self) -> None:
        """Cancel what has not started and wait for the rest (a few ms): no decode thread may
        outlive the stream, or a process forked afterwards (a DataLoader's workers) can inherit
        a lock one of them held and hang."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def uniform_channels(clips: list[np.ndarray]) -> list[np.ndarray]:
    """One channel count per batch (DALI's output is one dense tensor): grey clips [T, H, W, 1]
    become [T, H, W, 3] when another clip of the batch has colour."""
    if all(c.shape[-1] == clips[0].shape[-1] for c in clips):
        return clips
    return [np.repeat(c, 3, axis=-1) if c.shape[-1] == 1 else c for c in clips]


def grey_to_rgb(x: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 1] -> a new uint8 [..., H, W, 3] with R = G = B (the batch contract's
    three channels). A compiled loop (grey_kernels.py: 17x numpy's strided copy), not
    cv2.cvtColor: cv2 would run it on its process-wide thread pool, and a process forked
    afterwards (a DataLoader's workers) then hangs in cv2 (tests/test_host_decode.py)."""
    from .grey_kernels import grey_to_rgb_into

    src = np.ascontiguousarray(x)
    out = np.empty((*x.shape[:-1], 3), np.uint8)
    grey_to_rgb_into(src.reshape(-1), out.reshape(-1))
    return out
