"""Video decode (any codec PyAV reads) and the shard encode (docs/shards.md: one codec per corpus,
yuv420p, constant frame rate, no B-frames, GOP <= 8).

Frames are numpy uint8 `[F, H, W, 3]` RGB, or `[F, H, W]` for grey clips (most echo is
grey: one channel through decode, crop, resize and encode is ~3x less work, and the
encoder's neutral chroma is exact).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
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


@dataclass(kw_only=True, slots=True)
class FrameSink:
    """Collects decoded frames one at a time, each resized on arrival, so a clip's memory is
    bounded by the kept size (a 4K source never sits in memory whole).

    Frames arrive as uint8 [H, W] grey or [H, W, 3] RGB at the source size. Grey vs colour is
    decided on the first frame and re-checked on every `check_every`-th: a colour frame turns
    the clip RGB (earlier grey frames are replicated to three channels).
    """

    short_side: int = 0
    """Resize so the shorter side is at most this (0: keep the source size)."""
    check_every: int = 16
    frames: list = field(default_factory=list)
    source_size: tuple[int, int] = (0, 0)
    scale: float = 1.0
    """kept size / source size."""
    grey: bool = True

    def add(self, frame: np.ndarray) -> None:
        import cv2

        if not self.frames:
            self.source_size = frame.shape[:2]
            s = min(self.source_size)
            self.scale = min(1.0, self.short_side / s) if self.short_side and s else 1.0
            self.grey = frame.ndim == 2 or is_grey(frame)
        elif frame.ndim == 3 and self.grey and len(self.frames) % self.check_every == 0 and not is_grey(frame):
            self.grey = False
            self.frames = [np.repeat(f[..., None], 3, -1) for f in self.frames]
        if frame.ndim == 3 and self.grey:
            frame = frame[..., 1]  # G carries luma when R = G = B
        elif frame.ndim == 2 and not self.grey:
            frame = np.repeat(frame[..., None], 3, -1)
        if self.scale < 1.0:
            h, w = self.source_size
            size = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        self.frames.append(np.ascontiguousarray(frame))

    def result(self) -> np.ndarray:
        """uint8 [F, h, w] (grey) or [F, h, w, 3]."""
        return np.stack(self.frames)


@dataclass(kw_only=True, slots=True)
class DecodeReport:
    """What decoding one file met: frames damaged on the way are counted, never hidden."""

    frames: int = 0
    declared: int = 0
    """Frames the container header announces (0: it does not say)."""
    corrupt: int = 0
    """Frames the decoder flagged as corrupt (concealed damage) or packets it failed on."""

    @property
    def problems(self) -> str:
        """'' when clean, else a one-line account ('12 of 111 frames corrupt')."""
        out = []
        if self.corrupt:
            out.append(f"{self.corrupt} of {max(self.frames, self.declared)} frames corrupt")
        # a frame or 1% short of the header is an edit-list quirk of valid files, more is damage
        if self.declared and self.declared - self.frames > max(1, self.declared // 100):
            out.append(f"{self.declared - self.frames} of {self.declared} frames missing")
        return ", ".join(out)


def decode_video(path: str | Path, short_side: int = 0) -> tuple[np.ndarray, float, FrameSink, DecodeReport]:
    """Decode a video file frame by frame through a FrameSink (see there for `short_side`).
    Returns (frames uint8 [F, h, w(, 3)], fps, the sink (source size, scale), decode report).

    Raises DataError naming the file when it cannot be opened, has no video stream or no frame.
    """
    import av

    sink, rep = FrameSink(short_side=short_side), DecodeReport()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream")
            st = c.streams.video[0]
            # one thread: ingest's parallelism is its worker processes (frame threads cost ~15% more CPU)
            st.codec_context.thread_count = 1
            rep.declared = int(st.frames or 0)
            rate = st.average_rate or st.guessed_rate or st.base_rate
            fps = float(rate) if rate else 0.0
            for packet in c.demux(st):
                try:
                    decoded = packet.decode()
                except av.FFmpegError:
                    rep.corrupt += 1  # a packet the decoder rejects: its frame is lost
                    continue
                for f in decoded:
                    rep.frames += 1
                    rep.corrupt += bool(f.is_corrupt)
                    sink.add(_frame_array(f, sink))
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not sink.frames:
        raise DataError(f"{path}: video has no decodable frames")
    return sink.result(), fps, sink, rep


def _frame_array(frame, sink: FrameSink) -> np.ndarray:
    """A PyAV frame as the sink wants it: the luma plane while the clip is grey (RGB only on the
    frames the sink checks for colour), else RGB."""
    n = len(sink.frames)
    if sink.grey and (n % sink.check_every and n or neutral_chroma(frame)):
        return luma(frame)
    rgb = frame.to_ndarray(format="rgb24")
    # luma straight from the decoder on every grey frame (RGB's G differs by up to 1 level)
    return luma(frame) if sink.grey and is_grey(rgb) else rgb


_YUV8 = ("yuv420p", "yuv422p", "yuv444p", "yuv440p", "yuv411p", "yuv410p")
LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
"""Studio-range luma (16..235) -> full range: what FFmpeg's swscale computes for gray output."""


def luma(frame) -> np.ndarray:
    """uint8 [H, W]: exactly `frame.to_ndarray(format="gray")`, read from the Y plane of 8-bit
    planar YUV (a table lookup; swscale's conversion cost ~0.5 ms per 300x400 frame, more than
    decoding it). Other formats go through swscale."""
    import cv2

    name = frame.format.name
    full = name.startswith("yuvj") and name.replace("yuvj", "yuv") in _YUV8
    if not full and (name not in _YUV8 or frame.color_range == 2):  # 2: JPEG (full) range flagged
        return frame.to_ndarray(format="gray")
    p = frame.planes[0]
    y = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[: frame.height, : frame.width]
    return y.copy() if full else cv2.LUT(y, LIMITED_TO_FULL)


def neutral_chroma(frame) -> bool:
    """True when an 8-bit planar YUV frame's chroma is within 1 of neutral (128) everywhere: its
    RGB channels then differ by at most 4 (BT.601 and full range alike), so `is_grey` would say
    grey without the RGB conversion (~3 ms per 300x400 frame). False: convert and check."""
    name = frame.format.name.replace("yuvj", "yuv")
    if name not in _YUV8:
        return False
    for p in frame.planes[1:3]:
        c = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[: p.height, : p.width]
        if int(c.max()) > 129 or int(c.min()) < 127:
            return False
    return True


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
    """Number of frames FFmpeg decodes from encoded video bytes (the `.nframes` value).

    A VP9 WebM is counted from its container (trim.scan_frames, ~0.1 ms): WebM holds one
    block per displayed frame (a VP9 superframe carries any hidden frame in the same block).
    Anything else is decoded (at 224^2 that cost ingest ~12% of a clip's time)."""
    import av

    from .trim import NotCuttable, scan_frames

    if data[:4] == b"\x1a\x45\xdf\xa3" and b"V_VP9" in data[:4096]:
        try:
            return len(scan_frames(data))
        except NotCuttable:
            pass  # laced or unusual muxing: decode
    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        return sum(1 for _ in c.decode(st))


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
