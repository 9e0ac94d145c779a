"""Shard writer + DALI index (vs DALI's own wds2idx), manifest, orphans, and `shards verify`."""
import json
import shutil

import numpy as np
import pytest

from echofm.loaders.errors import DataError
from echofm.loaders.shard_verify import verify
from echofm.loaders.shards import (SampleRecord, ShardWriter, add_shard, clean_orphans, new_manifest, npy_bytes,
                                   pack_nframes, read_index, read_manifest, write_manifest)
from echofm.loaders.video_io import encode_video


def _video(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    for t in range(n):
        frames[t, 8 + t % 5:20 + t % 5, 6:26] = 150 + rng.integers(0, 50)
    return encode_video(frames, 25.0, "vp9")


def _write_shard(d, samples):
    """samples: list of (key, frames); returns the manifest."""
    w = ShardWriter(out_dir=d, index=0, split="train")
    for i, (key, n) in enumerate(samples):
        meta = {"key": key, "frames": n, "split": "train", "patient": f"p{i}"}
        comps = [("webm", _video(n, i)), ("json", json.dumps(meta).encode()), ("nframes", pack_nframes(n))]
        if i == 0:
            comps.append(("seg.npy", npy_bytes(np.ones((n, 32, 32), np.uint8))))  # 9344 B: tar padding
        w.add(key, comps, SampleRecord(key=key, source=f"/src/{key}", source_sha256="0" * 64,
                                       patient=f"p{i}", split="train", frames=n))
    m = new_manifest(codec="vp9", video_ext="webm", height=32, width=32, settings={})
    add_shard(m, w.finalize())
    write_manifest(d, m)
    return m


def test_index_equals_wds2idx_and_dali_reads_it(tmp_path):
    _write_shard(tmp_path, [("ds_a_1", 9), ("ds_b_2", 12), ("ds_c-3", 10)])
    from wds2idx import IndexCreator

    with IndexCreator(str(tmp_path / "shard-000000.tar"), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "shard-000000.idx").read_text().split() == (tmp_path / "ref.idx").read_text().split()
    assert [s[0][3] for s in read_index(tmp_path / "shard-000000.idx")] == [
        "ds_a_1.webm", "ds_b_2.webm", "ds_c-3.webm"]

    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        v, nf, meta = fn.readers.webdataset(
            paths=[str(tmp_path / "shard-000000.tar")], index_paths=[str(tmp_path / "shard-000000.idx")],
            ext=["webm", "nframes", "json"], dtypes=[types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error")
        return fn.decoders.video(v, device="cpu"), nf, meta

    p = pipe()
    p.build()
    for key, n in [("ds_a_1", 9), ("ds_b_2", 12), ("ds_c-3", 10)]:
        video, nf, meta = p.run()
        assert np.asarray(video[0]).shape == (n, 32, 32, 3)
        assert int(np.asarray(nf[0])[0]) == n
        assert json.loads(bytes(np.asarray(meta[0])))["key"] == key


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        read_manifest(tmp_path)


def test_bad_key_is_refused(tmp_path):
    w = ShardWriter(out_dir=tmp_path, index=0, split="train")
    with pytest.raises(ValueError, match="a.b"):
        w.add("a.b", [("json", b"{}")], SampleRecord(key="a.b", source="", source_sha256="", patient="",
                                                       split="train", frames=0))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_clean_orphans_removes_unlisted_and_temp_files(tmp_path):
    m = _write_shard(tmp_path, [("ds_a_1", 9)])
    for name in ("shard-000001.tar", "shard-000001.idx", "shard-000002.tar.tmp", "manifest.json.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("keep me")
    assert clean_orphans(tmp_path, m) == ["manifest.json.tmp", "shard-000001.idx", "shard-000001.tar",
                                          "shard-000002.tar.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "notes.txt", "shard-000000.idx", "shard-000000.samples.jsonl", "shard-000000.tar"]


def test_verify_passes_then_names_the_damaged_key(tmp_path, capsys):
    from echofm.engine.cli import main

    _write_shard(tmp_path, [("ds_a_1", 9), ("ds_b_2", 12), ("ds_c_3", 10)])
    rep = verify(tmp_path)
    assert rep.ok, rep.problems
    assert (rep.shards, rep.samples, rep.frames) == (1, 3, 31)
    assert main(["shards", "verify", str(tmp_path)]) == 0

    bad = tmp_path.parent / "bad"
    shutil.copytree(tmp_path, bad)
    ext, off, size, name = read_index(bad / "shard-000000.idx")[1][0]
    with open(bad / "shard-000000.tar", "r+b") as f:  # wipe the container header of ds_b_2's video
        f.seek(off)
        f.write(b"\0" * 64)
    rep = verify(bad)
    assert not rep.ok
    found = {(p.kind, p.key) for p in rep.problems}
    assert ("member_sha256", "ds_b_2") in found and ("shard_sha256", None) in found, rep.problems
    undecodable = [p for p in rep.problems if p.kind == "undecodable"]
    assert [p.key for p in undecodable] == ["ds_b_2"], rep.problems
    # the decoder's own words, not DALI's traceback around them
    assert str(undecodable[0]).startswith("shard-000000.tar ds_b_2: video does not decode (")
    assert "Failed to create video decoder" in undecodable[0].detail and "\n" not in undecodable[0].detail
    capsys.readouterr()
    assert main(["shards", "verify", str(bad)]) == 1
    assert "ds_b_2" in capsys.readouterr().out

    # a truncated count: .nframes says more frames than the video holds
    short = tmp_path.parent / "short"
    shutil.copytree(tmp_path, short)
    ext, off, size, name = read_index(short / "shard-000000.idx")[2][2]
    assert name == "ds_c_3.nframes"
    with open(short / "shard-000000.tar", "r+b") as f:
        f.seek(off)
        f.write(pack_nframes(11))
    assert [(p.kind, p.key, p.detail) for p in verify(short).problems if p.kind == "frame_count"][0] == (
        "frame_count", "ds_c_3", "json frames 10 != .nframes 11")


def test_decoder_reason_is_the_operators_own_line():
    """DALI wraps an operator's message in its traceback; verify and the stream report the message."""
    from echofm.loaders.pipeline import decoder_reason

    e = RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.video`,\n"
                     "which was used in the pipeline definition with the following traceback:\n\n"
                     '  File "x.py", line 9, in pipe\n    return fn.decoders.video(v)\n\nencountered:\n\n'
                     'Assert on "IsValid()" failed: Failed to create video decoder for "a.tar:0:k"\n'
                     "C++ context: [video_decoder_base.h:246] \nCurrent pipeline object is no longer valid.")
    assert decoder_reason(e) == 'Assert on "IsValid()" failed: Failed to create video decoder for "a.tar:0:k"'
    assert decoder_reason(ValueError("Invalid data found when processing input\nmore")) == \
        "Invalid data found when processing input"
    assert decoder_reason(RuntimeError("")) == "RuntimeError"
