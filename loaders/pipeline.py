"""The DALI graph of the stream: encoded clips -> decode the chosen frames -> crop/resize/flip.

One definition serves every backend: `decoder="mixed"` decodes on the GPU (NVDEC) and runs
the geometric ops there, `decoder="cpu"` runs everything on DALI's CPU threads, and
`decoder="host"` takes clips the stream already decoded (host_decode.py: grey clips as
luma, without DALI's RGB conversion) and runs only the geometric ops. Nothing else
differs, so the CPU tests cover the GPU graph.

Inputs arrive per batch from a Python callable (`fn.external_source`) that owns the sample
order, the clip starts and every random number (see `stream.py` for why): per sample
(roi, flip and seg only when the graph uses them, see `GraphSpec.inputs`)

    video    uint8 [bytes]      the encoded video, or its cut to the clip's GOPs (trim.py);
             uint8 [T, H, W, C] with decoder="host": the decoded clip (C = 1 grey, 3 RGB)
    frames   int32 [T]          frames to decode, indices into `video` (repeats allowed; not
                                with decoder="host")
    roi      float32 [4]        relative crop window (y0, x0, y1, x1) in the source frame
    flip     int32 []           1 = mirror horizontally
    seg      uint8 [T, H, W, 1] label maps of the same T frames (host-selected)

Outputs: video uint8 [B, T, size, size, C] (C = 3; with decoder="host" the input's C) and,
with masks, seg uint8 [B, T, size, size, 1] that went through the same crop/resize (nearest)
and flip.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import DataError


@dataclass(kw_only=True, slots=True)
class GraphSpec:
    """What the graph does; fixed for the life of a pipeline."""

    size: int
    """Output height = width."""
    in_height: int
    in_width: int
    """Source frame size (one per corpus, from the manifest)."""
    crop: bool
    """Apply the per-sample relative crop window (random-resized-crop)."""
    flip: bool
    """Apply the per-sample horizontal flip flag."""
    segmentation: bool
    decoder: str
    """'cpu' or 'mixed' (DALI decodes), or 'host' (the clips arrive decoded)."""
    batch_size: int
    num_threads: int
    device_id: int | None
    """CUDA device for 'mixed'; None for a CPU-only pipeline."""
    prefetch: int = 2
    """Batches DALI works ahead of the consumer."""

    def inputs(self) -> list[str]:
        """Names of the per-sample inputs `source()` returns, in order (unused ones left out)."""
        return (["video"] + ([] if self.decoder == "host" else ["frames"]) + (["roi"] if self.crop else [])
                + (["flip"] if self.flip else []) + (["seg"] if self.segmentation else []))


NVCUVID = "libnvcuvid.so.1"
"""The NVIDIA driver's video-decode library, which DALI's mixed decoder loads (NVDEC)."""


def require_nvdec(lib: str = NVCUVID) -> None:
    """Raise DataError unless `lib` loads. A GPU machine can have CUDA but not the driver's
    video libraries (containers without the 'video' capability); DALI then fails inside its
    pipeline, with a message about Docker."""
    import ctypes

    try:
        ctypes.CDLL(lib)
    except OSError as e:
        raise DataError(f"data.backend=mixed (NVDEC) needs the NVIDIA driver's {lib}, which does not "
                        f"load here ({e}): set data.backend=cpu (vp9/vp8/mjpeg shards), or run where "
                        "the driver's video libraries are present (containers: "
                        "NVIDIA_DRIVER_CAPABILITIES must include 'video')") from None


DALI_CAUSE = "encountered:"
"""DALI's operator errors read "Error in CPU operator ... traceback ... encountered:" and then
the operator's own message (e.g. 'Failed to create video decoder for "<tar>:<offset>:<key>"')."""


def decoder_reason(e: BaseException, limit: int = 200) -> str:
    """The operator's own message from a DALI error: the first line after `DALI_CAUSE`, else
    the first non-empty line; at most `limit` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if DALI_CAUSE in lines[:-1]:
        return lines[lines.index(DALI_CAUSE) + 1][:limit]
    return (lines[0] if lines else type(e).__name__)[:limit]


def build_pipeline(spec: GraphSpec, source: Callable[[], tuple]):
    """Build the DALI pipeline that pulls its inputs from `source()` (raise StopIteration at the end).

    `source()` returns one batch as a tuple of per-sample lists in the order of the module
    docstring (seg only when `spec.segmentation`).
    """
    from nvidia.dali import fn, pipeline_def, types

    names = spec.inputs()
    video_kind = (types.UINT8, 4, "FHWC") if spec.decoder == "host" else (types.UINT8, 1, "")
    kinds = {"video": video_kind, "frames": (types.INT32, 1, ""), "roi": (types.FLOAT, 1, ""),
             "flip": (types.INT32, 0, ""), "seg": (types.UINT8, 4, "FHWC")}
    resize = spec.crop or (spec.in_height, spec.in_width) != (spec.size, spec.size)

    @pipeline_def(batch_size=spec.batch_size, num_threads=spec.num_threads,
                  device_id=spec.device_id, prefetch_queue_depth=spec.prefetch, seed=0)
    def clip_pipeline():
        ins = dict(zip(names, fn.external_source(
            source=source, num_outputs=len(names), batch=True, dtype=[kinds[n][0] for n in names],
            ndim=[kinds[n][1] for n in names], layout=[kinds[n][2] for n in names])))
        roi, flip = ins.get("roi"), ins.get("flip")
        # `frames=` decodes exactly these (repeats and wrap-around order included);
        # pad_mode="none": a frame the decoder cannot produce is an error, never a black frame.
        video = ins["video"]
        if spec.decoder != "host":
            video = fn.decoders.video(video, device=spec.decoder, frames=ins["frames"], pad_mode="none")
        outs = [_geometry(video, roi, flip, spec, resize, False)]
        if spec.segmentation:
            seg = ins["seg"].gpu() if spec.decoder == "mixed" else ins["seg"]
            outs.append(_geometry(seg, roi, flip, spec, resize, True))
        return tuple(outs)

    pipe = clip_pipeline()
    pipe.build()
    return pipe


def _geometry(x, roi, flip, spec: GraphSpec, resize: bool, nearest: bool):
    """Crop window + resize to size x size (+ flip); the same params for video and masks.

    Masks take nearest-neighbour without antialiasing, so labels stay labels.
    """
    from nvidia.dali import fn, types

    if resize:
        kw = {}
        if spec.crop:
            kw = {"roi_start": roi[0:2], "roi_end": roi[2:4], "roi_relative": True}
        interp = types.INTERP_NN if nearest else types.INTERP_LINEAR
        x = fn.resize(x, size=[spec.size, spec.size], interp_type=interp,
                      antialias=not nearest, **kw)
    if spec.flip:
        x = fn.flip(x, horizontal=flip)
    return x
