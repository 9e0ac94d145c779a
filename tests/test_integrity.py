"""Nothing lost or corrupted in silence on the data path.

Per-member sha256s recorded at ingest: `shards verify` names each damaged sample (also in a
truncated tar); the stream refuses (or skips and counts) a sample whose bytes changed, so
64 flipped bytes in a video never reach the model as corrupt frames; a wrong `.nframes` is
named as such; damaged manifests and sample lists are one-line errors naming the file;
`data.max_dropped` bounds how much skip mode may lose."""
import json
import shutil

import numpy as np
import pytest

from echofm.loaders.errors import DataError
from echofm.loaders.shard_verify import verify
from echofm.loaders.shards import (SampleRecord, ShardWriter, add_shard, new_manifest, pack_nframes, read_index,
                                   read_manifest, read_sample_records, write_manifest)
from echofm.loaders.stream import ClipStream, StreamConfig
from echofm.loaders.video_io import encode_video


def _video(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)  # noise: every byte matters
    return encode_video(frames, 25.0, "vp9")


def _shards(d, n=4, frames=12, nframes=None, split="train"):
    """One shard of `n` 32x32 VP9 samples; `nframes` overrides what .nframes and the json say."""
    d.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out_dir=d, index=0, split=split)
    for i in range(n):
        key, nf = f"ds_p{i}_c{i}", nframes or frames
        meta = {"key": key, "frames": nf, "split": split, "patient": f"p{i}"}
        w.add(key, [("webm", _video(frames, i)), ("json", json.dumps(meta).encode()), ("nframes", pack_nframes(nf))],
              SampleRecord(key=key, source=f"/src/{key}", source_sha256="0" * 64, patient=f"p{i}", split=split,
                           frames=nf))
    m = new_manifest(codec="vp9", video_ext="webm", height=32, width=32, settings={})
    add_shard(m, w.finalize())
    write_manifest(d, m)
    return d


def _flip(d, sample: int, ext: str = "webm", n: int = 64) -> str:
    """Invert `n` bytes in the middle of a member (the container header stays valid) -> key."""
    _, off, size, name = next(c for c in read_index(d / "shard-000000.idx")[sample] if c[0] == ext)
    with open(d / "shard-000000.tar", "r+b") as f:
        f.seek(off + size // 2)
        data = f.read(n)
        f.seek(off + size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return name.split(".")[0]


def _cfg(d, **kw):
    base = dict(shards=str(d), num_frames=4, stride=1, size=32, batch_size=2, num_threads=1,
                shuffle=False, drop_last=False)
    return StreamConfig(**(base | kw))


def test_member_hashes_recorded_at_write(tmp_path):
    import hashlib

    d = _shards(tmp_path / "s", n=2)
    recs = read_sample_records(d, read_manifest(d))
    members = dict(read_index(d / "shard-000000.idx")[0][i][:3:2] for i in range(3))  # ext -> size
    assert set(recs[0]["member_sha256"]) == {"webm", "json", "nframes"} == set(members)
    _, off, size, _ = read_index(d / "shard-000000.idx")[0][0]
    with open(d / "shard-000000.tar", "rb") as f:
        f.seek(off)
        assert hashlib.sha256(f.read(size)).hexdigest() == recs[0]["member_sha256"]["webm"]


def test_flipped_video_bytes_never_train_silently(tmp_path):
    d = _shards(tmp_path / "s")
    key = _flip(d, 2)
    # Without the check the damage is invisible: the video still decodes (to corrupt frames).
    got = [m["key"] for b in ClipStream(_cfg(d, verify=False), train=False) for m in b["meta"]]
    assert key in got and len(got) == 4
    with pytest.raises(DataError, match=rf"sample {key}: \.webm differs from the sha256 recorded at ingest"):
        list(ClipStream(_cfg(d), train=False))
    s = ClipStream(_cfg(d, on_error="skip", max_dropped=0.25), train=False)
    got = [m["key"] for b in s for m in b["meta"]]
    assert key not in got and len(got) == 3 and s.stats["skipped"] == 1
    assert list(s.damaged) == [key] and ".webm differs" in s.damaged[key]
    assert not s.samples.unchecked[[0, 1, 3]].any()  # first touch: read once, checked once
    s.check_dropped()  # 1 of 4 = 25%: allowed
    s.cfg.max_dropped = 0.2
    with pytest.raises(DataError, match=r"1 of the 4 samples .* more than data.max_dropped=0.2"):
        s.check_dropped()


def test_shards_verify_names_each_damaged_sample(tmp_path, capsys):
    from echofm.engine.cli import main

    d = _shards(tmp_path / "s")
    keys = [_flip(d, 1), _flip(d, 3, "json", 2)]
    rep = verify(d, decode=False)
    assert [str(p) for p in rep.problems if p.kind == "member_sha256"] == [
        f"shard-000000.tar {keys[0]}: .webm differs from the sha256 recorded at ingest (damaged after ingest)",
        f"shard-000000.tar {keys[1]}: .json differs from the sha256 recorded at ingest (damaged after ingest)"]
    assert main(["shards", "verify", "--no-decode", str(d)]) == 1
    out = capsys.readouterr().out
    assert all(k in out for k in keys)

    # A truncated tar: the samples it lost are named (read at the index's offsets).
    t = _shards(tmp_path / "t")
    _, off, _, name = read_index(t / "shard-000000.idx")[2][0]
    with open(t / "shard-000000.tar", "r+b") as f:
        f.truncate(off + 10)
    probs = verify(t, decode=False).problems
    lost = [name.split(".")[0], read_index(t / "shard-000000.idx")[3][0][3].split(".")[0]]
    assert any(p.kind == "tar" and "unreadable tar" in p.detail for p in probs)
    assert {p.key for p in probs if p.kind == "component"} == set(lost), probs


def test_wrong_nframes_is_named(tmp_path):
    # .nframes and json agree on 1000 but the video holds 12 frames (hashes consistent).
    d = _shards(tmp_path / "s", n=2, nframes=1000)
    with pytest.raises(DataError, match=r"ds_p0_c0: \.nframes says 1000 frames but the video holds 12"):
        list(ClipStream(_cfg(d), train=False))
    # .nframes edited after ingest: the member hash names it; unchecked, the json disagrees.
    e = _shards(tmp_path / "e", n=2)
    _, off, _, _ = read_index(e / "shard-000000.idx")[1][2]
    with open(e / "shard-000000.tar", "r+b") as f:
        f.seek(off)
        f.write(pack_nframes(1000))
    with pytest.raises(DataError, match=r"ds_p1_c1: \.nframes differs from the sha256"):
        list(ClipStream(_cfg(e), train=False))
    with pytest.raises(DataError, match=r"ds_p1_c1: \.nframes says 1000 frames but its \.json says 12"):
        list(ClipStream(_cfg(e, verify=False), train=False))


@pytest.mark.parametrize("damage, message", [
    (lambda m: b"\xff\xfe" + m, r"manifest.json: unreadable manifest \('utf-8' codec"),
    (lambda m: json.dumps(dict(json.loads(m), shards=[{"tar": "shard-000000.tar"}])).encode(),
     r"manifest.json: shards\[0\] lacks 'idx'"),
    (lambda m: json.dumps(dict(json.loads(m), shards="shard-000000.tar")).encode(),
     r"manifest.json: field 'shards' is str"),
    (lambda m: json.dumps(dict(json.loads(m), splits=[])).encode(), r"manifest.json: field 'splits' is list"),
    (lambda m: json.dumps(dict(json.loads(m), shards=[dict(json.loads(m)["shards"][0], samples="4")])).encode(),
     r"manifest.json: shards\[0\]\.samples is str"),
])
def test_damaged_manifest_is_one_named_error(tmp_path, capsys, damage, message):
    from echofm.engine.cli import main

    d = _shards(tmp_path / "s", n=1)
    (d / "manifest.json").write_bytes(damage((d / "manifest.json").read_bytes()))
    with pytest.raises(DataError, match=message):
        read_manifest(d)
    with pytest.raises(DataError, match=message):
        ClipStream(_cfg(d))
    assert main(["shards", "verify", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json" in err


def test_damaged_sample_list_is_named(tmp_path):
    d = _shards(tmp_path / "s", n=2)
    side = d / "shard-000000.samples.jsonl"
    side.write_bytes(side.read_bytes()[:40] + b"\xff\n")
    with pytest.raises(DataError, match=r"samples.jsonl: cannot read shard sample list"):
        read_sample_records(d, read_manifest(d))
    side.write_text('{"key": "a", "source": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"samples.jsonl: line 2 is not a sample record"):
        ClipStream(_cfg(d))


def test_old_shards_without_member_hashes_warn(tmp_path):
    d = _shards(tmp_path / "s", n=2)
    side = d / "shard-000000.samples.jsonl"
    recs = [json.loads(x) for x in side.read_text().splitlines()]
    side.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "member_sha256"}) + "\n" for r in recs))
    with pytest.warns(UserWarning, match="no per-member sha256"):
        s = ClipStream(_cfg(d), train=False)
    assert len([m for b in s for m in b["meta"]]) == 2
    shutil.rmtree(d)


def test_verify_names_every_sample_a_truncated_tar_lost(tmp_path):
    """Regression (issue 29): a tar cut at a member boundary just ends early; the samples it
    lost (the last one here) are named from the index and the sample list."""
    d = _shards(tmp_path / "s")
    last = read_index(d / "shard-000000.idx")[-1]
    with open(d / "shard-000000.tar", "r+b") as f:
        f.truncate(last[0][1] - 512)  # just before the last sample's first header
    probs = verify(d, decode=False).problems
    assert [(p.key, p.detail) for p in probs if p.key] == [
        ("ds_p3_c3", "not in the tar (truncated or removed); the index or sample list names it")]
    (d / "shard-000000.idx").write_text("garbage\n")  # without a usable index: the sample list names it
    assert [p.key for p in verify(d, decode=False).problems if p.key] == ["ds_p3_c3"]


def test_a_sample_without_member_hashes_is_reported_as_unchecked(tmp_path):
    d = _shards(tmp_path / "s", n=3)
    side = d / "shard-000000.samples.jsonl"
    recs = [json.loads(x) for x in side.read_text().splitlines()]
    recs[1].pop("member_sha256")
    side.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = verify(d, decode=False)
    assert rep.ok and rep.unchecked == [recs[1]["key"]]
    assert f"1 sample(s) record no member sha256, their bytes cannot be checked (e.g. {recs[1]['key']}" in rep.summary()
    with pytest.warns(UserWarning, match=f"1 sample\\(s\\) record no per-member sha256 \\(e.g. {recs[1]['key']}\\)"):
        ClipStream(_cfg(d), train=False)
