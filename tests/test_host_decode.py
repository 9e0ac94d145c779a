"""The CPU backend's host decoder (loaders/host_decode.py): exactly the clip's frames, grey as
luma, colour as RGB, the fewest frames decoded, damage named; and the stream built on it
against DALI's CPU decoder on the same shards."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from echofm.loaders.host_decode import DecodeFailed, decode_clip, decode_spans, grey_to_rgb, uniform_channels
from echofm.loaders.trim import scan_frames
from echofm.loaders.video_io import encode_video, luma


def _ramp(n: int, colour: bool = False) -> np.ndarray:
    """Frame k: flat grey 40 + 5k with a dark bar at x = 10 + 2k (a red bar when colour)."""
    frames = np.empty((n, 64, 64, 3), np.uint8)
    for k in range(n):
        frames[k] = 40 + 5 * k
        frames[k, 8:56, 10 + 2 * k:16 + 2 * k] = (200, 0, 0) if colour else 0
    return frames if colour else frames[..., 0]


def _pyav(data: bytes, fmt: str) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as c:
        return [luma(f) if fmt == "gray" else f.to_ndarray(format=fmt) for f in c.decode(video=0)]


def _table(n: int, gop: int) -> np.ndarray:
    t = np.zeros((n, 3), np.int64)
    t[::gop, 2] = 1
    return t


def test_decode_spans_decode_each_needed_frame_once_from_the_nearest_keyframe():
    t = _table(20, 4)  # keyframes 0, 4, 8, 12, 16
    wrapped = np.array([14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5])
    assert decode_spans(t, wrapped) == [(0, 5), (12, 19)]  # ascending; 14 needs keyframe 12
    assert decode_spans(t, np.array([1, 9])) == [(0, 1), (8, 9)]  # keyframe 8 skips 2..7
    assert decode_spans(t, np.array([3, 5])) == [(0, 5)]  # 4 is a keyframe, but continuing costs the same
    assert decode_spans(t, np.array([2, 2, 2])) == [(0, 2)]  # repeats decode once
    assert decode_spans(_table(9, 1), np.array([8, 0, 4])) == [(0, 0), (4, 4), (8, 8)]  # all-intra


@pytest.mark.parametrize("scanned", [True, False])
def test_grey_clip_is_pyav_luma_at_the_indices_wrap_and_repeats_included(scanned):
    data = encode_video(_ramp(20), 30.0, gop=4)
    ref = _pyav(data, "gray")
    idx = np.array([14, 16, 18, 0, 2, 4, 4, 6])  # wraps round, repeats frame 4
    table = scan_frames(data) if scanned else None
    clip, decoded = decode_clip(data, table, idx, "vp9", (64, 64))
    assert clip.dtype == np.uint8 and clip.shape == (8, 64, 64, 1)
    np.testing.assert_array_equal(clip[..., 0], np.stack([ref[k] for k in idx]))
    # keyframes every 4: the frame table gives spans 0-2, 4-6, 12-14, 16-18 (3 and 15 skipped by
    # jumping to the next keyframe); the container decodes 0..18
    assert np.flatnonzero(scan_frames(data)[:, 2]).tolist() == [0, 4, 8, 12, 16]
    assert decoded == (12 if scanned else 19)


def test_colour_clip_comes_back_rgb_as_pyav_decodes_it():
    data = encode_video(_ramp(12, colour=True), 30.0, gop=4)
    ref = _pyav(data, "rgb24")
    idx = np.array([1, 3, 5, 7])
    clip, _ = decode_clip(data, scan_frames(data), idx, "vp9", (64, 64))
    assert clip.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(clip, np.stack([ref[k] for k in idx]))
    assert abs(int(clip[0, 30, 13, 0]) - 200) < 12 and clip[0, 30, 13, 1] < 40  # the red bar


def test_mjpeg_decodes_only_the_clip_frames():
    data = encode_video(_ramp(10), 30.0, "mjpeg", gop=1, quality=2)
    ref = _pyav(data, "gray")
    idx = np.array([8, 2, 2])
    clip, decoded = decode_clip(data, None, idx, "mjpeg", (64, 64))
    np.testing.assert_array_equal(clip[..., 0], np.stack([ref[k] for k in idx]))
    assert decoded == 2  # every MJPEG frame is a keyframe


def test_damage_and_wrong_sizes_are_named():
    data = encode_video(_ramp(12), 30.0, gop=4)
    table = scan_frames(data)
    with pytest.raises(DecodeFailed, match=r"frame 0 is 64x64, the manifest says 96x96"):
        decode_clip(data, table, np.arange(4), "vp9", (96, 96))
    broken = bytearray(data)
    off, size, _ = table[4]
    broken[off:off + size] = b"\xff" * size  # a keyframe's payload overwritten
    with pytest.raises(DecodeFailed):
        decode_clip(bytes(broken), table, np.array([4, 5]), "vp9", (64, 64))
    with pytest.raises(DecodeFailed, match=r"no frame 30"):  # past the end of the video
        decode_clip(data, None, np.array([0, 30]), "vp9", (64, 64))


@pytest.mark.parametrize("fmt", ["yuv420p", "yuvj420p", "yuv444p"])
def test_grey_luma_is_exactly_swscale_gray_and_refuses_colour(fmt):
    """The compiled 4:2:0 path (grey_kernels.py) and the numpy fallback give video_io.luma's
    values (= swscale's grey output) on neutral chroma, None once a chroma sample leaves 127..129."""
    import av

    from echofm.loaders.host_decode import grey_luma

    H, W = 16, 32  # every 8-bit luma value twice

    def frame(chroma: int, where: tuple[int, int] = (0, 0)):
        f = av.VideoFrame(W, H, fmt)
        for i, plane in enumerate(f.planes):
            a = np.full((plane.height, plane.line_size), 128, np.uint8)
            if i == 0:
                a[:H, :W] = (np.arange(H * W) % 256).reshape(H, W)
            else:
                a[where] = chroma
            plane.update(a.tobytes())
        return f

    for c in (127, 129):
        f = frame(c, (3, 5))
        np.testing.assert_array_equal(grey_luma(f)[..., 0], luma(f))
    for c in (126, 130):
        assert grey_luma(frame(c, (3, 5))) is None
        assert grey_luma(frame(c, (f.planes[1].height - 1, f.planes[1].width - 1))) is None  # last sample


def test_channels_of_a_batch():
    y = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(grey_to_rgb(y), np.repeat(y, 3, axis=-1))
    rgb = np.zeros((3, 8, 8, 3), np.uint8)
    out = uniform_channels([y[0], rgb])
    assert [c.shape[-1] for c in out] == [3, 3] and np.array_equal(out[0][..., 2], y[0][..., 0])
    grey = [y[0], y[1]]
    assert all(a is b for a, b in zip(uniform_channels(grey), grey))  # already uniform: untouched


def test_stream_host_decoder_matches_dali_cpu_decoder(tiny_shards):
    """Same shards, same draws: the same clips (frames_index, meta) and the same pictures up to
    the RGB conversion's rounding; the host decoder decodes no more frames."""
    from echofm.loaders.stream import ClipStream, StreamConfig

    got = {}
    for decoder in ("host", "dali"):
        s = ClipStream(StreamConfig(shards=str(tiny_shards), split="train", num_frames=8, stride=2, size=96,
                                    batch_size=3, random_resized_crop=(0.5, 1.0), flip=True,
                                    cpu_decoder=decoder))
        got[decoder] = (list(s), dict(s.stats))
        s.close()
    (host, hs), (dali, ds) = got["host"], got["dali"]
    assert len(host) == len(dali) > 0
    for a, b in zip(host, dali):
        assert a["video"].shape == b["video"].shape and a["video"].dtype == torch.uint8
        assert torch.equal(a["frames_index"], b["frames_index"])
        assert [m["key"] for m in a["meta"]] == [m["key"] for m in b["meta"]]
        assert torch.equal(a["video"][..., 0], a["video"][..., 2])  # grey: R = G = B
        diff = (a["video"].int() - b["video"].int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 12, (diff.float().mean(), diff.max())
    assert hs["frames"] == ds["frames"] and hs["decoded_frames"] <= ds["decoded_frames"]


def test_a_process_forked_after_the_stream_can_use_cv2(tiny_shards):
    """Regression: the batch's grey -> RGB copy ran on cv2's thread pool, and a process forked
    afterwards (a torch DataLoader's workers) hung in cv2.setNumThreads. In a fresh
    interpreter: this one has used cv2 for other reasons (ingest)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FORK_AFTER_STREAM, str(tiny_shards)], capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.split() == ["child", "ok"] * 2, (r.stdout, r.stderr[-2000:])


_FORK_AFTER_STREAM = """
import multiprocessing as mp, sys
from echofm.loaders.stream import ClipStream, StreamConfig

def child():
    import cv2
    cv2.setNumThreads(1)
    print("child ok", flush=True)

s = ClipStream(StreamConfig(shards=sys.argv[1], split="train", num_frames=8, stride=2, size=112, batch_size=4))
it = iter(s)
next(it)
s.close()
for _ in range(2):
    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(20)
    if p.is_alive():
        p.kill()
        sys.exit("the forked child hung")
"""
