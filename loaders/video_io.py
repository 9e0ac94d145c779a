"""Video decode (any codec PyAV reads) and the shard encode (DESIGN §2: one codec per corpus,
yuv420p, constant frame rate, no B-frames, GOP <= 8).

Frames are numpy uint8 `[F, H, W, 3]` RGB, or `[F, H, W]` for grey clips (most echo is
grey: one channel through decode, crop, resize and encode is ~3x less work, and the
encoder's neutral chroma is exact).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """How one shard codec is written."""

    container: str
    """FFmpeg muxer name."""
    ext: str
    """Component extension inside the shard tar (what the DALI reader is given)."""
    encoder: str
    """FFmpeg encoder name."""
    pix_fmt: str
    """Encoder pixel format (mjpeg wants full-range yuvj420p, the rest yuv420p)."""


CODECS: dict[str, CodecSpec] = {
    # webm: DALI's CPU and mixed decoders both read it; VP9 profile 0 is what NVDEC decodes.
    "vp9": CodecSpec(container="webm", ext="webm", encoder="libvpx-vp9", pix_fmt="yuv420p"),
    # h264 shards are GPU-only in DALI (its CPU backend has no H.264 decoder).
    "h264": CodecSpec(container="mp4", ext="mp4", encoder="libx264", pix_fmt="yuv420p"),
    "mjpeg": CodecSpec(container="avi", ext="avi", encoder="mjpeg", pix_fmt="yuvj420p"),
}


def encoder_options(codec: str, gop: int, quality: int) -> dict[str, str]:
    """FFmpeg options: realtime speed, no B-frames / alt-ref frames, keyframe every `gop`.

    `quality` is the CRF for vp9/h264 (lower = better) and q:v for mjpeg (2-31).
    """
    if codec == "vp9":
        # auto-alt-ref/lag-in-frames 0: no hidden alt-ref frames (VP9's B-frame analogue), so
        # every packet is one displayed frame and random-start decoding is exact.
        return {"deadline": "realtime", "cpu-used": "8", "crf": str(quality), "b": "0",
                "g": str(gop), "keyint_min": str(gop), "lag-in-frames": "0",
                "auto-alt-ref": "0", "row-mt": "1"}
    if codec == "h264":
        return {"preset": "veryfast", "crf": str(quality),
                "x264-params": f"bframes=0:keyint={gop}:min-keyint={gop}:scenecut=0"}
    if codec == "mjpeg":
        return {"q:v": str(quality)}
    raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")


def decode_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file. Returns (frames, fps): uint8 [F, H, W] when the
    clip is grey (checked on a few frames spread over it), else [F, H, W, 3] RGB.

    Raises DataError naming the file when it cannot be opened or has no video stream.
    """
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream")
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            raw = list(c.decode(st))
            rate = st.average_rate or st.guessed_rate or st.base_rate
            fps = float(rate) if rate else 0.0
            if not raw:
                raise DataError(f"{path}: video has no decodable frames")
            probe = [raw[i].to_ndarray(format="rgb24") for i in np.linspace(0, len(raw) - 1, min(4, len(raw))).astype(int)]
            grey = all(is_grey(p) for p in probe)
            frames = [f.to_ndarray(format="gray" if grey else "rgb24") for f in raw]
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    return np.stack(frames), fps


def is_grey(rgb: np.ndarray, tol: int = 4) -> bool:
    """True when the R, G, B channels of uint8 [..., 3] differ by at most `tol` (codec noise)."""
    a = rgb.astype(np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() <= tol and np.abs(a[..., 1] - a[..., 2]).max() <= tol)


def encode_video(frames: np.ndarray, fps: float, codec: str = "vp9", *, gop: int = 8,
                 quality: int | None = None) -> bytes:
    """Encode frames uint8 [F, H, W, 3] RGB or [F, H, W] grey (H, W even) as one CFR video;
    returns the file bytes."""
    import av

    spec = CODECS[codec]
    if quality is None:
        quality = default_quality(codec)
    buf = io.BytesIO()
    # The container's time base needs a rational rate; 1/1000 precision keeps e.g. 29.97.
    rate = _rational(fps)
    # bitexact: no random segment UIDs / muxer version strings, so equal input -> equal bytes
    # (shards are reproducible for any worker count).
    with av.open(buf, "w", format=spec.container, options={"fflags": "+bitexact"}) as c:
        s = c.add_stream(spec.encoder, rate=rate, options=encoder_options(codec, gop, quality))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], spec.pix_fmt
        s.thread_count = 1  # parallelism comes from ingest workers, one clip each
        fmt = "gray" if frames.ndim == 3 else "rgb24"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format=fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def default_quality(codec: str) -> int:
    """A visually clean default per codec (echo speckle survives; files stay small)."""
    return {"vp9": 32, "h264": 23, "mjpeg": 3}[codec]


def count_frames(data: bytes) -> int:
    """Number of frames FFmpeg decodes from encoded video bytes (the `.nframes` value)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        return sum(1 for _ in c.decode(st))


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode encoded video bytes to uint8 [F, H, W, 3] RGB."""
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] RGB (or already [F, H, W]) -> uint8 [F, H, W] luma, one cv2 call."""
    import cv2

    if frames.ndim == 3:
        return frames
    f, h, w, _ = frames.shape
    return cv2.cvtColor(np.ascontiguousarray(frames).reshape(f * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(f, h, w)


def _rational(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(30)
