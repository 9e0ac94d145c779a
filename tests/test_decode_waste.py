"""Decode only what is sampled (issue 26): stride folding at ingest (loaders/fold.py), the
per-run GOP cut of wrapping clips (trim.cut_clip), the cheap luma and frame count of ingest.

Ramp videos (frame k is flat grey 40 + 5k with a dark bar at x = 10 + 2k): the source frame
behind every delivered frame can be read back from its pixels, and is also checked against
PyAV's decode of the source file at the recorded index (frames_index x stride_folded).
"""
from __future__ import annotations

import csv
import io
import json
import warnings

import numpy as np
import pytest
import torch

from echofm.loaders.errors import DataError
from echofm.loaders.stream import ClipStream, StreamConfig

LENGTHS = (9, 12, 17, 24, 31, 36, 39, 40)  # source frames; clips of span 31 wrap on half of them


def _ramp(n: int) -> np.ndarray:
    frames = np.empty((n, 112, 112, 3), np.uint8)
    for k in range(n):
        frames[k] = 40 + 5 * k
        frames[k, 20:92, 10 + 2 * k:22 + 2 * k] = 0
    return frames


def _ingest(root, out, **kw):
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.video_io import encode_video

    (root / "videos").mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient", "split", "view", "ef"])
        for i, n in enumerate(LENGTHS):
            (root / f"videos/r{i}.avi").write_bytes(encode_video(_ramp(n), 30.0, "mjpeg", gop=1, quality=2))
            w.writerow([f"videos/r{i}.avi", f"p{i}", "train", "A4C", 50 + i])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended for CPU tests
        r = ingest([root], out, IngestConfig(size=112, codec="vp9", sector=False, progress=False, dataset="ramp",
                                             min_frames=4, **kw))
    assert r.added == len(LENGTHS), r
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """{"folded": fold_stride 2 + GOP 4 shards, "plain": unfolded GOP 8 shards} of the same sources."""
    root = tmp_path_factory.mktemp("fold")
    return {"folded": _ingest(root / "src", root / "folded", fold_stride=2, gop=4),
            "plain": _ingest(root / "src", root / "plain"), "src": root / "src"}


def _cfg(path, **kw) -> StreamConfig:
    base = dict(shards=str(path), split="train", num_frames=16, stride=2, size=112, batch_size=3, num_threads=2,
                drop_last=False)
    return StreamConfig(**{**base, **kw})


def _levels(video: torch.Tensor) -> np.ndarray:
    """float [B, T]: median grey level of each delivered frame."""
    return video[..., 1].reshape(*video.shape[:2], -1).float().median(dim=-1).values.numpy()


def _source_frames(src, key_meta: dict, shard_dir) -> np.ndarray:
    """PyAV's decode of the sample's source file (grey levels of each source frame)."""
    import av

    from echofm.loaders import ids

    key, _ = ids.load_key(ids.default_key_path(shard_dir), create=False)
    path = next(p for p in (src / "videos").iterdir() if ids.path_hash(key, f"videos/{p.name}") == key_meta["source"])
    with av.open(str(path)) as c:
        return np.asarray([np.median(f.to_ndarray(format="gray")) for f in c.decode(video=0)])


def test_fold_frames_keeps_every_sth_and_moves_annotations():
    from echofm.loaders.fold import fold_frames, stream_stride

    f = np.arange(9)[:, None, None].repeat(2, 1).repeat(2, 2).astype(np.uint8)
    seg = (np.arange(9)[:, None, None] * np.ones((1, 2, 2))).astype(np.uint8)
    kept, kseg, kframes = fold_frames(f, seg, [3, 8], 2)
    assert kept[:, 0, 0].tolist() == [0, 2, 4, 6, 8]  # ceil(9 / 2): the last source frame is kept
    assert kframes == [2, 4] and kseg[2, 0, 0] == 3 and kseg[4, 0, 0] == 8 and kseg[[0, 1, 3]].max() == 0
    assert fold_frames(f, None, [], 1)[0] is f
    assert stream_stride(4, 2, "m.json") == 2 and stream_stride(2, 1, "m.json") == 2
    with pytest.raises(DataError, match="m.json: .*fold_stride=2.*data.stride must be a multiple of 2, got 3"):
        stream_stride(3, 2, "m.json")


def test_folded_shards_record_the_fold(shards):
    from echofm.loaders.shards import iter_tar_samples, read_manifest

    m = read_manifest(shards["folded"])
    assert m["settings"]["fold_stride"] == 2 and m["settings"]["gop"] == 4
    got = []
    for s in m["shards"]:
        for _, comp in iter_tar_samples(shards["folded"] / s["tar"]):
            meta = json.loads(comp["json"])
            got.append(meta["frames"])
            assert meta["stride_folded"] == 2 and meta["fps"] == 15.0 and meta["source_fps"] == 30.0
    assert sorted(got) == sorted((n + 1) // 2 for n in LENGTHS)  # every other source frame, the last kept


@pytest.mark.parametrize("decoder", ["host", "dali"])
def test_folded_stream_delivers_the_source_frames_it_reports(shards, decoder):
    """Stride 2 on folded shards: shard frames at stride 1, each equal to PyAV's decode of the
    source file at frames_index x 2 (wrap-around included); frames decoded ~ frames sampled."""
    s = ClipStream(_cfg(shards["folded"], cpu_decoder=decoder))
    wrapped = 0
    for b in s:
        for row, lv, m in zip(b["frames_index"].numpy(), _levels(b["video"]), b["meta"]):
            n = m["frames"]
            src = _source_frames(shards["src"], m, shards["folded"])
            np.testing.assert_allclose(lv, src[row * m["stride_folded"]], atol=3)  # codec noise only
            np.testing.assert_array_equal(np.rint((lv - 40) / 10), row)  # shard frame i = source 2i
            if n < 16:
                wrapped += 1
                assert row.tolist() == [t % n for t in range(16)]
            else:
                assert np.all(np.diff(row) == 1)
    assert wrapped == sum((n + 1) // 2 < 16 for n in LENGTHS)
    assert s.stats["decoded_frames"] <= 1.2 * s.stats["frames"]  # decode waste <= 1.2


@pytest.mark.parametrize("decoder", ["host", "dali"])
def test_unfolded_shards_at_stride_2_decode_more_than_they_sample(shards, decoder):
    """The same sources unfolded: right frames (level 40 + 5k at source frame k), but the
    decoder produces frames the clip skips (the waste folding removes). DALI's decoder
    produces about two per sampled one; the host decoder decodes each needed frame once
    (a wrapped clip's frames too), so exactly what `decode_spans` plans on GOP-8 streams."""
    from echofm.loaders.host_decode import decode_spans

    plain = ClipStream(_cfg(shards["plain"], cpu_decoder=decoder))
    planned = 0
    for b in plain:
        for row, lv, m in zip(b["frames_index"].numpy(), _levels(b["video"]), b["meta"]):
            np.testing.assert_array_equal(np.rint((lv - 40) / 5), row)
            table = np.zeros((m["frames"], 3), np.int64)
            table[::8, 2] = 1  # ingest's keyframe every 8 frames
            planned += sum(b - a + 1 for a, b in decode_spans(table, row))
    if decoder == "dali":
        assert plain.stats["decoded_frames"] > 1.6 * plain.stats["frames"]
    else:
        assert plain.stats["decoded_frames"] == planned > 1.3 * plain.stats["frames"]


@pytest.mark.parametrize("decoder", ["host", "dali"])
def test_wrapped_clip_cut_per_run_is_bit_identical(shards, decoder):
    """Cut (trim.cut_clip; the host decoder's spans) vs decoding whole streams: same pixels,
    never more frames decoded."""
    for path in (shards["plain"], shards["folded"]):
        # evaluation's evenly spaced clips: the last ones start late in each video
        cut = ClipStream(_cfg(path, eval_clips=3, cpu_decoder=decoder), train=False)
        whole = ClipStream(_cfg(path, eval_clips=3, cut_gops=False, cpu_decoder=decoder), train=False)
        a, b = list(cut), list(whole)
        assert all(torch.equal(x["video"], y["video"]) and torch.equal(x["frames_index"], y["frames_index"])
                   for x, y in zip(a, b)) and len(a) == len(b)
        assert cut.stats["decoded_frames"] <= whole.stats["decoded_frames"]
        if path == shards["plain"]:  # starts past the first keyframe: fewer frames decoded
            assert cut.stats["decoded_frames"] < whole.stats["decoded_frames"]


def test_stream_refuses_a_stride_the_fold_cannot_serve(shards):
    with pytest.raises(DataError, match=r"manifest.json: the shards were ingested with fold_stride=2"):
        ClipStream(_cfg(shards["folded"], stride=1))
    s = ClipStream(_cfg(shards["folded"], stride=4, num_frames=4))  # 4 = 2 x 2: shard stride 2
    b = next(iter(s))
    assert np.all(np.diff(b["frames_index"].numpy(), axis=1) % 2 == 0)


def test_cut_clip_indices_and_keyframes():
    from echofm.loaders.trim import cut_clip, scan_frames
    from echofm.loaders.video_io import encode_video

    data = encode_video(_ramp(20)[..., 0], 30.0, gop=4)
    frames = scan_frames(data)
    idx = np.array([14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5])
    ivf, local = cut_clip(data, frames, idx, "vp9", 112, 112)
    # runs [14..19] from keyframe 12 (8 frames), then [0..5] from keyframe 0 (6 frames)
    assert local.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    import av

    with av.open(io.BytesIO(ivf)) as c:
        got = [np.median(f.to_ndarray(format="gray")) for f in c.decode(video=0)]
    assert len(got) == 14
    np.testing.assert_allclose(np.asarray(got)[local], 40 + 5 * idx, atol=3)


@pytest.mark.parametrize("fmt", ["yuv420p", "yuvj420p", "yuv444p", "yuvj422p"])
def test_luma_is_exactly_swscale_gray(fmt):
    import av

    from echofm.loaders.video_io import luma

    H, W = 16, 32  # every 8-bit luma value twice
    f = av.VideoFrame(W, H, fmt)
    for i, plane in enumerate(f.planes):
        a = np.full((plane.height, plane.line_size), 128, np.uint8)
        if i == 0:
            a[:H, :W] = (np.arange(H * W) % 256).reshape(H, W)
        plane.update(a.tobytes())
    for color_range in (0, 1, 2):
        f.color_range = color_range
        np.testing.assert_array_equal(luma(f), f.to_ndarray(format="gray"))


def test_vp9_frame_count_from_the_container_equals_decoding():
    import av

    from echofm.loaders.video_io import count_frames, encode_video

    for n, gop in ((1, 8), (37, 8), (20, 4)):
        data = encode_video(_ramp(n)[..., 0], 29.97, gop=gop)
        with av.open(io.BytesIO(data)) as c:
            assert count_frames(data) == sum(1 for _ in c.decode(video=0)) == n


def test_neutral_chroma_implies_grey_rgb():
    """The fast grey check (chroma within 1 of 128) never says grey where the RGB check would not."""
    import av

    from echofm.loaders.video_io import is_grey, neutral_chroma

    for fmt in ("yuv420p", "yuvj420p", "yuv444p"):
        for u in (127, 128, 129):
            for v in (127, 128, 129):
                f = av.VideoFrame(64, 8, fmt)
                for i, plane in enumerate(f.planes):
                    a = np.full((plane.height, plane.line_size), (0, u, v)[i], np.uint8)
                    if i == 0:
                        a[:, :64] = (np.arange(8 * 64) % 256).reshape(8, 64)
                    plane.update(a.tobytes())
                for color_range in (0, 1, 2):
                    f.color_range = color_range
                    assert neutral_chroma(f) and is_grey(f.to_ndarray(format="rgb24")), (fmt, u, v, color_range)
    f = av.VideoFrame(64, 8, "yuv420p")
    for i, plane in enumerate(f.planes):
        plane.update(np.full((plane.height, plane.line_size), 131 if i == 2 else 128, np.uint8).tobytes())
    assert not neutral_chroma(f)


def test_cli_fold_stride_defaults_to_gop_4(shards, tmp_path):
    from echofm.engine.cli import main
    from echofm.loaders.shards import read_manifest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ingest", str(shards["src"]), "--out", str(tmp_path / "s"), "--size", "112", "--no-sector",
                     "--min-frames", "4", "--fold-stride", "2", "--id-key", str(tmp_path / "k")]) == 0
    settings = read_manifest(tmp_path / "s")["settings"]
    assert settings["fold_stride"] == 2 and settings["gop"] == 4


def test_folding_into_shards_written_before_folding_is_refused(shards, tmp_path):
    """A manifest without settings.fold_stride holds unfolded samples: a folded resume is refused."""
    import shutil

    from echofm.loaders.ingest import IngestConfig, ingest

    out = tmp_path / "old"
    shutil.copytree(shards["plain"], out)
    m = json.loads((out / "manifest.json").read_text())
    del m["settings"]["fold_stride"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"fold_stride=1.*fold_stride=2"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest([shards["src"]], out, IngestConfig(size=112, sector=False, progress=False, dataset="ramp",
                                                  min_frames=4, fold_stride=2, gop=8,
                                                  id_key=str(shards["plain"]) + ".idkey"))
