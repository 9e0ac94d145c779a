"""ClipStream: the DALI clip stream (issue 4) on the CPU backend.

Two shard sets, both written by `ingest()` (the project's one shard writer):
- `tiny_shards` (conftest): the synthetic echo corpus, for the batch contract.
- `ramp_shards` (here): videos whose frame k is flat gray 40 + 5k with a dark bar at
  x = 10 + 2k, and a mask of that bar: the frame index of every decoded frame can be read
  back from its pixels (known ground truth), and masks can be checked against the video.
  Lengths 9..40 frames, so clips of span 31 wrap around on half of them.
"""
from __future__ import annotations

import csv
import io
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

from echofm.loaders.errors import DataError
from echofm.loaders.stream import ClipStream, StreamConfig

# distinct lengths: ingest records byte-identical videos once (resume and duplicates are by content)
RAMP_LENGTHS = (9, 12, 17, 24, 31, 36, 39, 40)
SPAN16 = 31  # (16 - 1) * 2 + 1


def _ramp_video(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [n, 112, 112, 3] and mask uint8 [n, 112, 112] (1 on the dark bar)."""
    frames = np.empty((n, 112, 112, 3), np.uint8)
    mask = np.zeros((n, 112, 112), np.uint8)
    for k in range(n):
        frames[k] = 40 + 5 * k
        x0 = 10 + 2 * k
        frames[k, 20:92, x0:x0 + 12] = 0
        mask[k, 20:92, x0:x0 + 12] = 1
    return frames, mask


def _ingest_ramp(root, out, codec: str, lengths=RAMP_LENGTHS):
    from echofm.loaders.ingest import IngestConfig, ingest
    from echofm.loaders.video_io import encode_video

    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient", "split", "view", "mask", "ef"])
        for i, n in enumerate(lengths):
            frames, mask = _ramp_video(n)
            (root / f"videos/r{i}.avi").write_bytes(encode_video(frames, 30.0, "mjpeg", gop=1, quality=2))
            np.save(root / f"masks/r{i}.npy", mask)
            w.writerow([f"videos/r{i}.avi", f"p{i}", "train", "A4C", f"masks/r{i}.npy", 50 + i])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended for CPU tests
        report = ingest([root], out, IngestConfig(size=112, codec=codec, sector=False, progress=False,
                                                  dataset="ramp"))
    assert report.added == len(lengths), report
    return out


@pytest.fixture(scope="module")
def ramp_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ramp")
    return _ingest_ramp(root / "src", root / "shards", "vp9")


def _cfg(shards, **kw) -> StreamConfig:
    base = dict(shards=str(shards), split="train", num_frames=16, stride=2, size=112, batch_size=3,
                num_threads=2)
    base.update(kw)
    return StreamConfig(**base)


def _epoch(stream) -> list[dict]:
    return list(stream)


def _frame_from_pixels(video: torch.Tensor) -> np.ndarray:
    """Ramp frame index of each frame: the median background level is 40 + 5k."""
    v = video[..., 1].reshape(*video.shape[:2], -1).float()
    level = v.median(dim=-1).values.numpy()
    return np.rint((level - 40) / 5).astype(np.int64)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        [m["key"] for m in x["meta"]] == [m["key"] for m in y["meta"]]
        and torch.equal(x["frames_index"], y["frames_index"]) and torch.equal(x["video"], y["video"])
        for x, y in zip(a, b))


def test_batch_contract(tiny_shards):
    cfg = _cfg(tiny_shards, num_frames=8, size=64, batch_size=2)
    s = ClipStream(cfg, train=True, device=torch.device("cpu"))
    batches = _epoch(s)
    assert len(batches) == len(s) > 0
    for b in batches:
        v, idx = b["video"], b["frames_index"]
        assert v.dtype == torch.uint8 and v.device.type == "cpu" and tuple(v.shape) == (2, 8, 64, 64, 3)
        assert idx.dtype == torch.int64 and tuple(idx.shape) == (2, 8)
        for row, m in zip(idx.tolist(), b["meta"]):
            n = m["frames"]
            # T frames at stride 2 from a valid start, modulo the frame count
            assert row == [(row[0] + 2 * t) % n for t in range(8)]
            assert 0 <= row[0] <= max(n - 15, 0)
            assert m["split"] == "train" and isinstance(m["labels"], dict) and m["key"]
            assert {"period", "ed", "es", "view"} <= set(m)
        assert v.float().mean() > 5  # real content, not padding
    assert s.stats["clips"] == 2 * len(batches) and s.stats["frames"] == 16 * len(batches)
    assert s.stats["decoded_frames"] >= s.stats["frames"] and s.stats["skipped"] == 0


def test_frames_match_index_and_wrap_around(ramp_shards):
    s = ClipStream(_cfg(ramp_shards, drop_last=False))
    seen_short = 0
    for b in _epoch(s):
        got = _frame_from_pixels(b["video"])
        for row, frames, m in zip(b["frames_index"].numpy(), got, b["meta"]):
            n = m["frames"]
            np.testing.assert_array_equal(frames, row)  # the decoded pixels are those frames
            if n < SPAN16:  # loops: starts at 0, wraps modulo n, repeats frames
                seen_short += 1
                assert row.tolist() == [(2 * t) % n for t in range(16)]
            else:
                assert 0 <= row[0] <= n - SPAN16 and np.all(np.diff(row) == 2)
        per_frame_mean = b["video"].float().mean(dim=(2, 3, 4))
        assert per_frame_mean.min() > 30  # no black (padded) frame anywhere
    assert seen_short == sum(n < SPAN16 for n in RAMP_LENGTHS)


def test_gop_cut_decodes_the_same_pixels(ramp_shards):
    from echofm.loaders.shards import read_index
    from echofm.loaders.trim import NotCuttable, scan_frames

    # the WebM scan finds every frame and the keyframes ingest put every 8 frames
    idx = sorted(ramp_shards.glob("*.idx"))[0]
    tar = idx.with_suffix(".tar").read_bytes()
    for comps in read_index(idx):
        c = {ext: (off, size) for ext, off, size, _ in comps}
        (o, n), (no, _) = c["webm"], c["nframes"]
        frames = scan_frames(tar[o:o + n])
        nf = int(np.frombuffer(tar[no:no + 4], "<i4")[0])
        assert len(frames) == nf and np.flatnonzero(frames[:, 2]).tolist() == list(range(0, nf, 8))
    with pytest.raises(NotCuttable):
        scan_frames(b"\x1a\x45\xdf\xa3" + b"\x00" * 60)
    # trim.py hands DALI only the GOPs a clip needs; the decoded frames must not change
    for cfg in (_cfg(ramp_shards, drop_last=False), _cfg(ramp_shards, num_frames=4, eval_clips=3)):
        train = cfg.eval_clips == 1  # the eval config's last clips start late in each video
        cut = ClipStream(cfg, train=train)
        cfg.cut_gops = False
        whole = ClipStream(cfg, train=train)
        assert _same(_epoch(cut), _epoch(whole))
        assert cut.stats["decoded_frames"] <= whole.stats["decoded_frames"]
    assert cut.stats["decoded_frames"] < 0.8 * whole.stats["decoded_frames"]  # fewer frames decoded


def test_deterministic_by_seed_and_epoch(ramp_shards):
    cfg = _cfg(ramp_shards, batch_size=2, size=64, random_resized_crop=(0.5, 1.0), flip=True)
    a, b = ClipStream(cfg), ClipStream(cfg)
    a.set_epoch(1)
    b.set_epoch(1)
    ea, eb = _epoch(a), _epoch(b)
    assert _same(ea, eb)
    assert a.epoch == 2  # a finished epoch moves on
    c = ClipStream(cfg)
    c.set_epoch(2)
    ec = _epoch(c)
    keys = lambda e: [m["key"] for x in e for m in x["meta"]]  # noqa: E731
    assert keys(ec) != keys(ea)
    assert _same(_epoch(a), ec)  # a's pipeline ran on into epoch 2: the same batches
    d = ClipStream(_cfg(ramp_shards, batch_size=2, size=64, seed=1))
    d.set_epoch(1)
    assert keys(_epoch(d)) != keys(ea)


def test_epochs_run_on_after_a_loop_stops(ramp_shards):
    cfg = _cfg(ramp_shards, batch_size=3, num_frames=4, drop_last=False)
    ref = ClipStream(cfg)
    e0, e1 = _epoch(ref), _epoch(ref)
    s = ClipStream(cfg)
    it = iter(s)
    head = [next(it) for _ in range(len(e0))]  # every batch of epoch 0, the loop not finished
    assert (s.state_dict()["epoch"], s.state_dict()["position"]) == (1, 0)  # saved here: epoch 1 next
    assert _same(head, e0) and _same(_epoch(s), e1)  # a new loop is epoch 1, not an empty one
    assert s.epoch == 2


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_and_cover(ramp_shards, world):
    cfg = _cfg(ramp_shards, batch_size=2, num_frames=4, drop_last=False)
    per_rank = []
    for r in range(world):
        s = ClipStream(cfg, rank=r, world_size=world)
        s.set_epoch(3)
        per_rank.append([m["key"] for b in _epoch(s) for m in b["meta"]])
    flat = [k for ks in per_rank for k in ks]
    n = len(RAMP_LENGTHS)
    assert len(set(flat)) == len(flat)  # disjoint
    assert all(len(ks) == n // world for ks in per_rank)  # equal shares: same steps on every rank
    assert len(flat) == n - n % world  # the whole epoch but the < world remainder
    # evaluation: the ranks split every clip between them, in order, nothing dropped
    everything = [m["key"] for b in ClipStream(cfg, train=False) for m in b["meta"]]
    ev = [m["key"] for r in range(world)
          for b in ClipStream(cfg, train=False, rank=r, world_size=world) for m in b["meta"]]
    assert len(everything) == n and ev == everything


def test_selected_samples_split_across_ranks(ramp_shards):
    """keys= (a fine-tune's labelled patients): only those samples, disjoint per rank, and a
    resume refuses a state planned over another sample set."""
    cfg = _cfg(ramp_shards, batch_size=1, num_frames=4)
    keys = [m["key"] for b in ClipStream(cfg, train=False) for m in b["meta"]]
    chosen = set(keys[::2])
    parts = [[m["key"] for b in _epoch(ClipStream(cfg, rank=r, world_size=2, keys=chosen)) for m in b["meta"]]
             for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(chosen) and not set(parts[0]) & set(parts[1])
    with pytest.raises(DataError, match="1 selected sample.* not in split 'train', e.g. nope"):
        ClipStream(cfg, keys={"nope"})
    with pytest.raises(DataError, match="items="):
        ClipStream(cfg).load_state_dict(ClipStream(cfg, keys=chosen).state_dict())


def test_flip_and_crop_are_per_clip_geometry(ramp_shards):
    plain = _epoch(ClipStream(_cfg(ramp_shards, batch_size=4)))
    flipped = _epoch(ClipStream(_cfg(ramp_shards, batch_size=4, flip=True)))
    cropped = _epoch(ClipStream(_cfg(ramp_shards, batch_size=4, random_resized_crop=(0.3, 0.6))))
    n_flipped, widths = 0, []
    bar = lambda v: (v[..., 1] < 20).sum(dim=2).max().item()  # noqa: E731  widest dark run per row
    for p, f, c in zip(plain, flipped, cropped):
        # same (seed, epoch, rank, batch) -> same clips and starts; only the geometry differs
        assert torch.equal(p["frames_index"], f["frames_index"])
        assert torch.equal(p["frames_index"], c["frames_index"])
        for vp, vf, vc in zip(p["video"], f["video"], c["video"]):
            mirrored = torch.equal(vf, vp.flip(2))
            assert mirrored or torch.equal(vf, vp)  # whole clip mirrored or untouched
            n_flipped += mirrored
            assert bar(vp) == 12 and not torch.equal(vc, vp)
            widths.append(bar(vc))
    assert 0 < n_flipped < 8
    # a crop of 30-60% of the area resized back zooms in: where the bar is in view it is wider
    assert max(widths) >= 15


def test_exact_mid_epoch_resume(ramp_shards):
    cfg = _cfg(ramp_shards, batch_size=2, size=64, random_resized_crop=(0.6, 1.0), flip=True)
    ref = ClipStream(cfg)
    ref.set_epoch(4)
    full = _epoch(ref)
    assert len(full) == 4
    s = ClipStream(cfg)
    s.set_epoch(4)
    it = iter(s)
    head = [next(it), next(it)]
    state = pickle.loads(pickle.dumps(s.state_dict()))
    assert state["epoch"] == 4 and state["position"] == 2
    del it, s
    resumed = ClipStream(cfg)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # a trainer's per-epoch call keeps the restored position
    assert _same(head + _epoch(resumed), full)
    assert resumed.epoch == 5 and resumed.state_dict()["position"] == 0
    with pytest.raises(DataError, match="data.seed=0, this stream has data.seed=1"):
        ClipStream(_cfg(ramp_shards, batch_size=2, size=64, seed=1)).load_state_dict(state)


def test_eval_clips_deterministic_and_evenly_spaced(ramp_shards):
    cfg = _cfg(ramp_shards, batch_size=4, eval_clips=3)
    a = _epoch(ClipStream(cfg, train=False))
    assert _same(a, _epoch(ClipStream(cfg, train=False)))
    metas = [m for b in a for m in b["meta"]]
    rows = torch.cat([b["frames_index"] for b in a]).numpy()
    assert len(metas) == 3 * len(RAMP_LENGTHS)
    for i, (m, row) in enumerate(zip(metas, rows)):
        k = i % 3
        assert m["clip_index"] == k and m["key"] == metas[i - k]["key"]  # in order, clips together
        nvalid = max(m["frames"] - SPAN16 + 1, 1)
        assert row[0] == int(np.floor(k * (nvalid - 1) / 2 + 0.5))
    centre = _epoch(ClipStream(_cfg(ramp_shards, batch_size=4), train=False))
    for b in centre:
        for row, m in zip(b["frames_index"].numpy(), b["meta"]):
            assert row[0] == int(np.floor((max(m["frames"] - SPAN16 + 1, 1) - 1) / 2 + 0.5))


def test_segmentation_masks_follow_the_sampled_frames(ramp_shards):
    from echofm.loaders.shards import read_index

    s = ClipStream(_cfg(ramp_shards, segmentation=True, drop_last=False))
    masks = {}
    for shard in sorted(ramp_shards.glob("*.idx")):
        tar = shard.with_suffix(".tar").read_bytes()
        for comps in read_index(shard):
            for ext, off, size, name in comps:
                if ext == "seg.npy":
                    masks[name.split(".")[0]] = np.load(io.BytesIO(tar[off:off + size]))
    for b in _epoch(s):
        assert b["seg"].dtype == torch.uint8 and tuple(b["seg"].shape[1:]) == (16, 112, 112)
        for seg, row, m in zip(b["seg"].numpy(), b["frames_index"].numpy(), b["meta"]):
            np.testing.assert_array_equal(seg, masks[m["key"]][row])
    # Through random-resized-crop + flip + resize: the mask still marks the video's dark bar.
    s = ClipStream(_cfg(ramp_shards, segmentation=True, size=64, random_resized_crop=(0.4, 1.0),
                        flip=True, batch_size=4))
    for b in _epoch(s):
        dark = b["video"][..., 1] < 20
        agree = (dark == (b["seg"] == 1)).float().mean().item()
        assert agree > 0.97, agree
        assert set(b["seg"].unique().tolist()) <= {0, 1}  # nearest: labels stay labels


def test_h264_shards_on_cpu_fail_before_the_pipeline(tmp_path):
    shards = _ingest_ramp(tmp_path / "src", tmp_path / "shards", "h264", lengths=(12,))
    with pytest.raises(DataError, match=r"h264.*CPU backend cannot decode.*--codec vp9.*GPU"):
        ClipStream(_cfg(shards, backend="cpu"), device=torch.device("cpu"))


@pytest.fixture()
def damaged_shards(ramp_shards, tmp_path):
    """A copy of ramp_shards with one video's container header overwritten (bypasses ingest)."""
    from echofm.loaders.shards import read_index

    out = tmp_path / "damaged"
    shutil.copytree(ramp_shards, out)
    idx = sorted(out.glob("*.idx"))[0]
    ext, off, size, name = read_index(idx)[2][0]
    assert ext == "webm"
    with open(idx.with_suffix(".tar"), "r+b") as f:
        f.seek(off)
        f.write(b"\0" * 64)
    return out, idx.with_suffix(".tar").name, name.split(".")[0]


@pytest.mark.parametrize("decoder", ["host", "dali"])
def test_damaged_sample_named_or_skipped(damaged_shards, decoder):
    shards, tar, key = damaged_shards
    # The decoder's own failure path (the member-hash check, on by default, would name the
    # sample before decoding: see test_integrity.py).
    cfg = _cfg(shards, batch_size=3, num_frames=4, drop_last=False, verify=False, cpu_decoder=decoder)
    with pytest.raises(DataError, match=rf"{tar}: sample {key}: the video cannot be decoded"):
        _epoch(ClipStream(cfg))
    cfg.on_error = "skip"
    s = ClipStream(cfg)
    got = [m["key"] for b in _epoch(s) for m in b["meta"]]
    assert key not in got and len(got) == len(RAMP_LENGTHS) - 1
    assert s.stats["skipped"] == 1 and s.epoch == 1
    assert list(s.damaged) == [key] and "cannot be decoded" in s.damaged[key]
    got2 = [m["key"] for b in _epoch(s) for m in b["meta"]]  # known bad: dropped again, counted
    assert key not in got2 and s.stats["skipped"] == 2
    cfg.batch_size = 1  # the damaged sample's batch is left empty: skipped, counted once
    s = ClipStream(cfg)
    assert len(_epoch(s)) == len(RAMP_LENGTHS) - 1 and s.stats["skipped"] == 1


@pytest.mark.gpu(reason="DALI mixed (NVDEC) backend")
def test_mixed_backend_matches_contract(ramp_shards):
    dev = torch.device("cuda", 0)
    s = ClipStream(_cfg(ramp_shards, backend="mixed", drop_last=False), device=dev)
    for b in _epoch(s):
        assert b["video"].device == dev and b["video"].dtype == torch.uint8
        np.testing.assert_array_equal(_frame_from_pixels(b["video"].cpu()), b["frames_index"].numpy())
