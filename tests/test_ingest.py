"""Ingest end to end: the synthetic corpus (labels, masks, splits, periods), rejects, resume,
kill -9 safety, worker determinism, by-patient split rules. (Resume by content, duplicates,
privacy, locks, dead workers, damaged files, the quality report: test_ingest_robust.py.)"""
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from echofm.loaders.errors import DataError
from echofm.loaders import ids
from echofm.loaders.ingest import IngestConfig, hash_split, ingest, plan
from echofm.loaders.ingest_clip import resample_fps
from echofm.loaders.shard_verify import verify
from echofm.loaders.shards import iter_tar_samples, read_manifest
from echofm.loaders.sources.base import Clip
from echofm.loaders.synth import ClipSpec, render_clip, write_video


def _samples(out):
    m = read_manifest(out)
    return m, [(s, k, c) for s in m["shards"] for k, c in iter_tar_samples(out / s["tar"])]


def test_synthetic_corpus_shards_keep_labels_masks_splits_and_periods(tiny_shards, synth_corpus):
    rows = {r["file"]: r for r in csv.DictReader(open(synth_corpus / "labels.csv"))}
    assert (tiny_shards / "rejects.jsonl").read_text() == ""
    m, samples = _samples(tiny_shards)
    assert len(samples) == len(rows) == m["total_samples"] == sum(m["splits"].values())
    assert (m["codec"], m["video_ext"], m["height"], m["width"]) == ("vp9", "webm", 112, 112)
    key, _ = ids.load_key(ids.default_key_path(tiny_shards), create=False)
    by_source = {ids.path_hash(key, f): r for f, r in rows.items()}
    patients = {r["patient"] for r in rows.values()}
    patient_split, hits, n = {}, 0, 0
    for shard, key, comp in samples:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", key)
        assert set(comp) == {"webm", "json", "nframes", "seg.npy"}
        meta = json.loads(comp["json"])
        row = by_source[meta["source"]]
        assert meta["key"] == key and meta["split"] == shard["split"] == row["split"]
        assert meta["frames"] == int(row["frames"]) == int(np.frombuffer(comp["nframes"], "<i4")[0])
        assert meta["view"] == row["view"] and meta["labels"]["ef"] == pytest.approx(float(row["ef"]))
        assert meta["labels"]["grade"] == int(row["grade"]) and meta["codec"] == "vp9"
        assert not any(p in json.dumps(meta) + key for p in patients)  # ids never in clear text
        seg = np.load(io.BytesIO(comp["seg.npy"]))
        assert seg.shape == (meta["frames"], 112, 112) and seg.dtype == np.uint8
        assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg == 1).any()
        assert meta["seg_frames"] == [t for t in range(meta["frames"]) if seg[t].any()]
        assert patient_split.setdefault(meta["patient"], meta["split"]) == meta["split"]
        period = int(row["period"])
        if meta["frames"] >= 2 * period:
            n += 1
            hits += meta["period"] is not None and abs(meta["period"] - period) <= 1.0
    assert n >= 2 and hits / n >= 0.9, f"period within 1 frame on {hits}/{n} clips"  # more in test_cycles
    rep = verify(tiny_shards)
    assert rep.ok, rep.problems


def _good_clip(path, seed, frames=24):
    spec = ClipSpec(name="g", patient="p", view="A4C", ef=50.0, grade=0, period=12, ed_offset=0, systole=4,
                    fps=25, frames=frames, height=64, width=72, container="mp4", split="train", seed=seed)
    write_video(path, render_clip(spec).video, 25, "mp4")


def _corpus(d, n_good=4, bad=True):
    """A CSV corpus of n_good clips (+ a corrupt, a too-short and a static one)."""
    (d / "v").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        _good_clip(d / "v" / f"good{i}.mp4", i)
        rows.append({"path": f"v/good{i}.mp4", "patient": f"P{i // 2}", "ef": 40 + i})
    if bad:
        (d / "v" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(2000))
        _good_clip(d / "v" / "short.mp4", 9, frames=5)
        write_video(d / "v" / "static.mp4", np.full((20, 64, 72), 90, np.uint8), 25, "mp4")
        rows += [{"path": f"v/{n}.mp4", "patient": f"Q{n}", "ef": 50} for n in ("corrupt", "short", "static")]
    with open(d / "list.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "patient", "ef"])
        w.writeheader()
        w.writerows(rows)
    return d / "list.csv"


def _run(src, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ingest([src], out, IngestConfig(size=64, progress=False, **kw))


def test_rejects_are_recorded_and_a_second_run_adds_nothing(tmp_path, capsys):
    src = _corpus(tmp_path / "src")
    out = tmp_path / "out"
    rep = _run(src, out)
    assert (rep.added, rep.rejected, rep.skipped) == (4, 3, 0)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    key, _ = ids.load_key(ids.default_key_path(out), create=False)
    name = {ids.path_hash(key, f"v/{n}.mp4"): n for n in ("corrupt", "short", "static")}
    reasons = {name[r["source"]]: r for r in rejects}  # sources are keyed hashes, never paths
    assert set(reasons) == {"corrupt", "short", "static"}
    assert reasons["corrupt"]["kind"] == "cannot_decode" and "cannot decode" in reasons["corrupt"]["reason"]
    assert "corrupt.mp4" not in json.dumps(rejects) and str(src.parent) not in json.dumps(rejects)
    assert reasons["short"]["reason"].startswith("too short: 5 frames") and reasons["short"]["kind"] == "too_short"
    assert reasons["static"]["reason"].startswith("no ultrasound sector")
    assert not any(r["transient"] for r in rejects)
    files = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.name != "quality_report.json"}  # noqa: E731
    before = files()  # (the report describes the latest run)
    rep2 = _run(src, out)
    assert (rep2.added, rep2.rejected, rep2.skipped, rep2.shards) == (0, 0, 7, [])
    assert files() == before  # nothing rewritten
    from echofm.engine.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ingest", str(src), "--out", str(out), "--size", "64"]) == 0  # the CLI resumes too
        assert "0 added, 7 skipped" in capsys.readouterr().out  # permanent rejects are not retried
        assert files() == before
        assert main(["ingest", str(tmp_path / "nope"), "--out", str(out), "--size", "64"]) == 2
    assert "nope: source does not exist" in capsys.readouterr().err
    m, samples = _samples(out)
    assert m["total_samples"] == 4 and len({k for _, k, _ in samples}) == 4
    with pytest.raises(DataError, match="codec='vp9'"):  # resuming with other settings is refused
        _run(src, out, codec="mjpeg")


_KILLER = """
import os, signal, sys, warnings
warnings.simplefilter("ignore")
from echofm.loaders import ingest as ing
orig, calls = ing.ShardWriter.finalize, [0]
def finalize(self):
    entry = orig(self)          # shard renamed into place ...
    calls[0] += 1
    if calls[0] == 2:           # ... but the manifest never learns of the second one
        os.kill(os.getpid(), signal.SIGKILL)
    return entry
ing.ShardWriter.finalize = finalize
ing.ingest([sys.argv[1]], sys.argv[2], ing.IngestConfig(size=64, shard_size=1, progress=False))
"""


def test_kill_9_leaves_no_half_shard_and_resume_completes(tmp_path):
    src = _corpus(tmp_path / "src", n_good=4, bad=False)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", _KILLER, str(src), str(out)], capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    m = read_manifest(out)
    assert [s["tar"] for s in m["shards"]] == ["shard-000000.tar"]  # the renamed shard-000001 is not listed
    assert (out / "shard-000001.tar").exists()
    (out / "shard-000002.tar.tmp").write_bytes(b"half a shard")  # as if killed mid-write
    rep = _run(src, out, shard_size=1)
    assert (rep.added, rep.skipped) == (3, 1)
    m, samples = _samples(out)
    assert m["total_samples"] == 4 and len({json.loads(c["json"])["source"] for _, _, c in samples}) == 4
    assert not list(out.glob("*.tmp"))
    assert verify(out, decode=False).ok


def test_workers_write_identical_shards(tmp_path):
    src = _corpus(tmp_path / "src", n_good=3, bad=False)
    ids.load_key(tmp_path / "corpus.key", create=True)  # one key: the same patient ids and keys
    _run(src, tmp_path / "one", workers=1, id_key=str(tmp_path / "corpus.key"))
    _run(src, tmp_path / "two", workers=2, id_key=str(tmp_path / "corpus.key"))
    a, b = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def _clip(patient, split=None, name="x.mp4"):
    return Clip(source=f"/data/{patient}/{name}", rel_source=f"{patient}/{name}", reader="video",
                dataset="ds", patient=patient, split=split)


KEY = bytes(range(32))


def _plan(clips, existing=(), cfg=None):
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(clips))]  # distinct content
    return plan(clips, shas, cfg or IngestConfig(), list(existing), KEY)


def test_splits_are_by_patient_and_conflicts_are_errors():
    cfg = IngestConfig()
    clips = [_clip(f"P{i}", name=f"{j}.mp4") for i in range(200) for j in range(2)]
    jobs = _plan(clips)
    split_of = {}
    for j in jobs:
        assert split_of.setdefault(j.phash, j.split) == j.split
        assert j.phash == ids.patient_hash(KEY, "ds", j.clip.patient) != ids.patient_hash(KEY[::-1], "ds", j.clip.patient)
        assert j.split == hash_split(j.phash, cfg.split_fractions)
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    # a source split is honoured for every clip of that patient, also ones without a split
    jobs = _plan([_clip("A", "TEST", "1.mp4"), _clip("A", None, "2.mp4")])
    assert [j.split for j in jobs] == ["test", "test"]
    with pytest.raises(DataError, match="splits must be by patient"):
        _plan([_clip("A", "train", "1.mp4"), _clip("A", "val", "2.mp4")])
    ph = ids.patient_hash(KEY, "ds", "A")
    with pytest.raises(DataError, match="already ingested in split 'train'"):
        _plan([_clip("A", "val", "3.mp4")], existing=[{"patient": ph, "split": "train", "key": "k"}])
    assert len({j.key for j in _plan(clips)}) == len(clips)


def test_resample_fps_indices():
    np.testing.assert_array_equal(resample_fps(10, 50.0, 25.0), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(resample_fps(4, 25.0, 50.0), [0, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(resample_fps(6, 30.0, 20.0), [0, 2, 3, 5])


def test_foreign_shard_files_without_manifest_are_not_touched(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(DataError, match="no manifest.json"):
        _run(tmp_path / "shard-000000.tar", tmp_path)
    assert (tmp_path / "shard-000000.tar").read_bytes() == b"someone else's shard"


@pytest.mark.parametrize("codec,ext", [("mjpeg", "avi"), ("h264", "mp4")])
def test_other_codecs_ingest_and_verify(tmp_path, codec, ext):
    src = _corpus(tmp_path / "src", n_good=2, bad=False)
    rep = _run(src, tmp_path / "out", codec=codec)
    assert rep.added == 2
    m, samples = _samples(tmp_path / "out")
    assert (m["codec"], m["video_ext"]) == (codec, ext) and all(ext in c for _, _, c in samples)
    v = verify(tmp_path / "out")
    assert v.ok, v.problems
    assert ("PyAV" in v.decoder) == (codec == "h264")  # DALI's CPU backend has no H.264 decoder
