"""Ingest on hostile inputs (issue 29): a file still being written, a file name that is not
UTF-8, a dangling symlink, identifier columns in a labels CSV, a stopped worker, a full disk
or read-only --out, the id key inside --out."""
import csv
import errno
import json
import os
import signal
import time
import warnings

import pytest

from echofm.loaders import ingest as ingest_mod
from echofm.loaders import shards as shards_mod
from echofm.loaders.errors import DataError
from echofm.loaders.ingest import IngestConfig, Kind, ingest
from echofm.loaders.shard_verify import verify
from echofm.loaders.shards import read_manifest
from echofm.loaders.sources import load as load_mod
from echofm.loaders.sources.base import looks_identifying
from echofm.loaders.synth import ClipSpec, render_clip, write_video
from echofm.loaders.workers import WorkerDied, imap_supervised


def _video(path, seed, frames=24):
    spec = ClipSpec(name="g", patient="p", view="A4C", ef=50.0, grade=0, period=12, ed_offset=0, systole=4,
                    fps=25, frames=frames, height=64, width=72, container="mp4", split="train", seed=seed)
    write_video(path, render_clip(spec).video, 25, "mp4")


def _run(src, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended for CPU tests
        return ingest(src if isinstance(src, list) else [src], out, IngestConfig(size=64, progress=False, **kw))


def _rejects(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_a_file_growing_during_the_ingest_never_gives_two_samples(tmp_path, monkeypatch):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "full.mp4", seed=1)
    full = (src / "full.mp4").read_bytes()
    clip = src / "clip.mp4"
    clip.write_bytes(full[: len(full) // 2])  # the writer is half way
    real = load_mod.load_clip

    def writer_finishes(c, **kw):  # the writer goes on between the hash and the decode
        if c.source == str(clip) and clip.stat().st_size < len(full):
            clip.write_bytes(full)
        return real(c, **kw)

    monkeypatch.setattr(load_mod, "load_clip", writer_finishes)
    rep = _run([str(clip)], out)
    assert (rep.added, rep.rejected) == (0, 1)
    assert _rejects(out)[0]["kind"] == Kind.GROWING and _rejects(out)[0]["transient"]
    rep = _run([str(clip)], out)  # finished now: hashed and decoded from the same bytes
    assert (rep.added, rep.rejected) == (1, 0)
    assert _run([str(clip)], out).added == 0
    assert read_manifest(out)["total_samples"] == 1 and verify(out, decode=False).ok


def test_a_file_that_changes_while_hashed_is_a_transient_reject(tmp_path, monkeypatch):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "c.mp4", seed=2)
    real = ingest_mod.sha256_file

    def grows(path):
        h = real(path)
        with open(path, "ab") as f:
            f.write(b"\0" * 100)
        return h

    monkeypatch.setattr(ingest_mod, "sha256_file", grows)
    rep = _run(src, out)
    assert (rep.added, rep.rejected) == (0, 1) and _rejects(out)[0]["kind"] == Kind.GROWING


def test_a_source_ingested_before_it_was_complete_is_not_ingested_again(tmp_path):
    """A writer that paused long enough for a whole ingest: the partial file went in (its
    frames decoded); when it is complete, the next run does not add a second sample."""
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "c.mp4", seed=3, frames=24)
    assert _run(src, out).added == 1
    _video(src / "c.mp4", seed=3, frames=40)  # the same source, now longer
    rep = _run(src, out)
    assert (rep.added, rep.rejected) == (0, 1)
    r = _rejects(out)[0]
    assert r["kind"] == Kind.CHANGED and "not ingested twice" in r["reason"] and not r["transient"]
    assert read_manifest(out)["total_samples"] == 1
    assert _run(src, out).rejected == 0  # recorded once, skipped afterwards


def test_a_file_name_that_is_not_utf8_is_ingested(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "ok.mp4", seed=4)
    _video(src / "x.mp4", seed=5)
    os.rename(src / "x.mp4", os.fsencode(src) + b"/bad_\xff\xfe.mp4")
    rep = _run(src, out)
    assert (rep.added, rep.rejected) == (2, 0)
    assert _run(src, out).skipped == 2  # and resumes


def test_a_dangling_symlink_is_counted_not_skipped_in_silence(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "ok.mp4", seed=6)
    os.symlink(tmp_path / "gone.mp4", src / "link.mp4")
    os.symlink(tmp_path / "gone.bin", src / "link.bin")
    rep = _run(src, out)
    assert (rep.added, rep.rejected) == (1, 1)
    r = _rejects(out)[0]
    assert r["kind"] == Kind.MISSING and "dangling symlink" in r["reason"] and r["transient"]
    assert rep.quality.ignored == {"(dangling symlink)": 1}


def test_identifier_columns_never_reach_a_shard_file_and_others_are_named(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "a.mp4", seed=7)
    with open(src / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "ef", "patient_name", "MRN", "dob", "Accession Number", "home_address",
                    "phone", "lvh", "comment"])
        w.writerow(["a.mp4", "PATIENT-0042", "55.5", "John Doe", "MRN7777777", "1950-01-02", "ACC99999", "1 Elm Street",
                    "555-0100", "1", "ok"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = ingest([src], out, IngestConfig(size=64, progress=False, label_columns=("lvh",)))
    assert rep.added == 1
    text = [str(w.message) for w in caught]
    ident = next(t for t in text if "identifiers" in t)
    assert all(c in ident for c in ("patient_name", "mrn", "dob", "accession number", "home_address", "phone"))
    assert "John" not in " ".join(text)
    assert any("comment" in t and "dropped" in t for t in text)
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for value in (b"John Doe", b"MRN7777777", b"1950-01-02", b"ACC99999", b"Elm Street", b"555-0100", b"PATIENT-0042"):
        assert value not in blob
    sample = json.loads(next(iter(shards_mod.iter_tar_samples(out / read_manifest(out)["shards"][0]["tar"])))[1]["json"])
    assert sample["labels"] == {"ef": 55.5, "lvh": 1}
    with pytest.raises(ValueError, match="look like patient identifiers"):
        IngestConfig(label_columns=("mrn",)).validate()


@pytest.mark.parametrize("name,identifying", [("patient_name", True), ("MRN", True), ("date_of_birth", True),
                                              ("AccessionNumber", True), ("phone_number", True), ("ef", False),
                                              ("grade", False), ("image_quality", False), ("lvh", False)])
def test_identifier_like_column_names(name, identifying):
    assert looks_identifying(name) == identifying


def _stop_on_marked(job, cfg):
    if job.clip.source.endswith("stop.mp4"):
        os.kill(os.getpid(), signal.SIGSTOP)
    return ingest_mod.process_clip(job, cfg)


def test_a_stopped_worker_costs_its_clip_a_timeout_reject_and_the_run_goes_on(tmp_path, monkeypatch):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    for i, n in enumerate(("a", "stop", "z")):
        _video(src / f"{n}.mp4", seed=30 + i)
    monkeypatch.setattr(ingest_mod, "process_clip", _stop_on_marked)
    t0 = time.monotonic()
    rep = _run(src, out, workers=2, clip_timeout=4.0)
    assert time.monotonic() - t0 < 60
    assert (rep.added, rep.rejected) == (2, 1)
    r = _rejects(out)[0]
    assert r["kind"] == Kind.TIMEOUT and "no answer after 4 s" in r["reason"]


def _sleepy(x):
    if x == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    return x * 10


def test_supervised_pool_kills_a_stopped_worker_after_the_timeout():
    got = list(imap_supervised(_sleepy, [0, 1, 2], 2, timeout=2.0))
    assert got[0] == 0 and got[2] == 20
    assert isinstance(got[1], WorkerDied) and got[1].timeout == 2.0


def test_a_full_disk_ends_the_ingest_with_one_line_and_keeps_what_was_complete(tmp_path, monkeypatch):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    for i in range(3):
        _video(src / f"c{i}.mp4", seed=10 + i)
    real, calls = shards_mod.ShardWriter.add, []

    def add(self, key, comps, rec):
        calls.append(key)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, comps, rec)

    monkeypatch.setattr(shards_mod.ShardWriter, "add", add)
    with pytest.raises(DataError, match=r"shards: No space left on device \(ingest stopped"):
        _run(src, out)
    monkeypatch.setattr(shards_mod.ShardWriter, "add", real)
    kept = read_manifest(out)["total_samples"]  # 1, or 0 when the half-written shard held the first
    assert kept <= 1 and verify(out, decode=False).ok
    assert _run(src, out).added == 3 - kept  # the rerun resumes
    assert read_manifest(out)["total_samples"] == 3 and verify(out, decode=False).ok


def test_a_read_only_out_is_one_line(tmp_path, monkeypatch):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "c.mp4", seed=20)
    out.mkdir()

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system", str(out / ".ingest.lock"))

    monkeypatch.setattr(ingest_mod.DirLock, "__enter__", read_only)
    with pytest.raises(DataError, match=r"\.ingest\.lock: Read-only file system"):
        _run(src, out)


def test_an_id_key_inside_the_shard_directory_is_warned_about(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    _video(src / "c.mp4", seed=21)
    with pytest.warns(UserWarning, match="id key is inside the shard directory"):
        ingest([src], out, IngestConfig(size=64, progress=False, id_key=str(out / "secret.idkey")))


def test_two_sites_with_the_same_relative_path_under_one_dataset_are_both_ingested(tmp_path):
    """The one-sample-per-source rule keys the source by dataset, patient and relative path:
    another site's `clip.mp4` (another patient) is not mistaken for a changed source."""
    out = tmp_path / "shards"
    for i, site in enumerate(("siteA", "siteB")):
        d = tmp_path / site
        d.mkdir()
        _video(d / "clip.mp4", seed=40 + i)
        (d / "labels.csv").write_text(f"path,patient\nclip.mp4,{site}-P1\n")
        rep = _run(d, out, dataset="echo")
        assert (rep.added, rep.rejected) == (1, 0)


def test_a_csv_manifest_that_is_not_utf8_is_one_line(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "labels.csv").write_bytes(b"path,patient\nc.mp4,M\xfcller\n")
    with pytest.raises(DataError, match=r"labels\.csv: not UTF-8 text at byte 20"):
        _run(src, tmp_path / "shards")
