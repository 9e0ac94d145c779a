"""Ingest on real-world trouble (issue 15): resume and duplicates by content, privacy (keyed
ids, no paths), transient vs permanent rejects, damaged files, a second ingest locked out,
a dead worker, memory bounded by the output size, files not listed or oddly named, the
quality report and the dry run."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from echofm.loaders import ids
from echofm.loaders import ingest as ingest_mod
from echofm.loaders.errors import DataError
from echofm.loaders.ingest import IngestConfig, ingest
from echofm.loaders.shard_verify import verify
from echofm.loaders.shards import iter_tar_samples, read_manifest
from echofm.loaders.synth import ClipSpec, render_clip, write_video
from echofm.loaders.workers import WorkerDied, imap_supervised

_REAL_PROCESS = ingest_mod.process_clip


def _video(path, seed, frames=24, h=64, w=72, container="mp4"):
    spec = ClipSpec(name="g", patient="p", view="A4C", ef=50.0, grade=0, period=12, ed_offset=0, systole=4,
                    fps=25, frames=frames, height=h, width=w, container=container, split="train", seed=seed)
    write_video(path, render_clip(spec).video, 25, container)


def _run(src, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size < 128 is intended for CPU tests
        return ingest(src if isinstance(src, list) else [src], out, IngestConfig(size=64, progress=False, **kw))


def _all_bytes(*dirs) -> bytes:
    return b"".join(p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file())


def test_moved_tree_adds_nothing_and_repeated_content_is_recorded_once(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(3):
        _video(src / f"c{i}.mp4", seed=i)
    shutil.copy(src / "c1.mp4", src / "c1-copy.mp4")  # same content, another name (and patient)
    out = tmp_path / "shards"
    rep = _run(src, out)
    assert (rep.added, rep.duplicates, rep.rejected) == (3, 1, 0)
    key, _ = ids.load_key(ids.default_key_path(out), create=False)
    assert rep.quality.duplicates == [ids.path_hash(key, "c1.mp4")]  # files come sorted: c1-copy.mp4 first
    assert any("repeat content" in w for w in rep.quality.warnings)
    # move and rename the tree: nothing new
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    src.rename(moved)
    (moved / "c0.mp4").rename(moved / "zz.mp4")
    rep = _run(moved, out)
    assert (rep.added, rep.skipped, rep.duplicates, rep.shards) == (0, 4, 0, [])
    m = read_manifest(out)
    assert m["total_samples"] == 3 and verify(out, decode=False).ok


def test_no_clear_path_name_or_id_in_any_output_and_the_key_guards_resume(tmp_path):
    root = tmp_path / "Smith_John_echo"
    (root / "Smith_John").mkdir(parents=True)
    for i in range(2):
        _video(root / "Smith_John" / f"Smith_John_{i}.mp4", seed=i)
    (root / "Smith_John" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "ef"])
        w.writerows([[f"Smith_John/Smith_John_{i}.mp4", "MRN0012345", 50] for i in range(2)]
                    + [["Smith_John/broken.mp4", "MRN0012345", 40]])
    out = tmp_path / "shards"
    rep = _run(root, out)
    assert (rep.added, rep.rejected) == (2, 1) and rep.id_key_created
    blob = _all_bytes(out)
    for secret in (b"Smith", b"John", b"MRN0012345", b"0012345", str(tmp_path).encode(), b"broken"):
        assert secret not in blob, secret
    key_file = ids.default_key_path(out)
    assert key_file.parent == out.parent and oct(key_file.stat().st_mode)[-3:] == "600"
    key, _ = ids.load_key(key_file, create=False)
    m = read_manifest(out)
    metas = [json.loads(c["json"]) for s in m["shards"] for _, c in iter_tar_samples(out / s["tar"])]
    assert {x["patient"] for x in metas} == {ids.patient_hash(key, "Smith-John-echo", "MRN0012345")}
    assert {x["dataset"] for x in metas} == {"d" + ids.keyed(key, "dataset:Smith-John-echo", 8)}
    # resuming needs the same key: a missing or another key is refused, not silently replaced
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    with pytest.raises(DataError, match="not the id key this corpus was ingested with"):
        _run(root, out, id_key=str(other))
    key_file.rename(tmp_path / "kept.key")
    with pytest.raises(DataError, match="id key is missing"):
        _run(root, out)
    rep = _run(root, out, id_key=str(tmp_path / "kept.key"))  # the user names where it lives
    assert (rep.added, rep.skipped) == (0, 3)


def test_transient_rejects_are_retried_and_permanent_ones_only_when_asked(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _video(src / "a.mp4", seed=1)
    _video(tmp_path / "b.mp4", seed=2)
    (src / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    with open(src / "list.csv", "w", newline="") as f:
        f.write("path,patient\na.mp4,p1\nb.mp4,p2\nbad.mp4,p3\n")
    out = tmp_path / "shards"
    rep = _run(src / "list.csv", out)
    assert (rep.added, rep.rejected) == (1, 2)
    kinds = {r["kind"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert kinds["missing_file"]["transient"] and not kinds["cannot_decode"]["transient"]
    shutil.copy(tmp_path / "b.mp4", src / "b.mp4")  # the file is back
    rep = _run(src / "list.csv", out)
    assert (rep.added, rep.rejected, rep.skipped) == (1, 0, 2)  # b retried; bad.mp4 not
    rep = _run(src / "list.csv", out, retry_rejects=True)
    assert (rep.added, rep.rejected) == (0, 1)


def test_a_file_with_flipped_bytes_is_rejected_with_its_damage_counted(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _video(src / "ok.mp4", seed=3, frames=111, h=112, w=112)
    data = bytearray((src / "ok.mp4").read_bytes())
    for i in np.random.default_rng(0).integers(len(data) // 10, len(data) - 2000, 40):
        data[i] ^= 0xFF
    (src / "flipped.mp4").write_bytes(bytes(data))
    rep = _run(src, tmp_path / "out")
    assert (rep.added, rep.rejected) == (1, 1)
    (r,) = map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())
    assert r["kind"] == "corrupt_frames" and "of 111 frames corrupt" in r["reason"], r


def test_a_truncated_file_is_rejected_with_the_frames_it_lacks(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _video(tmp_path / "whole.avi", seed=4, frames=60, container="avi")
    data = (tmp_path / "whole.avi").read_bytes()
    (src / "cut.avi").write_bytes(data[:len(data) // 2])  # a copy that stopped half way
    rep = _run(src, tmp_path / "out")
    (r,) = map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())
    assert rep.added == 0 and r["kind"] == "corrupt_frames" and "of 60 frames missing" in r["reason"], r


def test_a_second_ingest_is_locked_out_and_told_who_holds_the_lock(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    _video(src / "a.mp4", seed=1)
    out = tmp_path / "shards"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom echofm.loaders.shards import DirLock\n"
                               "DirLock(sys.argv[1]).__enter__()\nprint('locked', flush=True)\ntime.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match=rf"another ingest is writing here \(pid {holder.pid} on .+, since 20"):
            _run(src, out)
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _run(src, out).added == 1  # the kernel dropped the dead holder's lock


def _square(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return x * x


def test_supervised_pool_keeps_order_and_reports_a_dead_worker():
    got = list(imap_supervised(_square, range(8), 2, window=3))
    assert got[:3] == [0, 1, 4] and got[4:] == [16, 25, 36, 49]
    assert isinstance(got[3], WorkerDied) and got[3].exitcode == -signal.SIGKILL
    assert "SIGKILL" in got[3].reason


def _die_on_marked(job, cfg):
    if "die" in os.path.basename(job.clip.source):
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_PROCESS(job, cfg)


def test_a_dead_worker_costs_its_clip_not_the_run(tmp_path, monkeypatch):
    src = tmp_path / "raw"
    src.mkdir()
    for i, name in enumerate(("a", "b-die", "c", "d")):
        _video(src / f"{name}.mp4", seed=i)
    monkeypatch.setattr(ingest_mod, "process_clip", _die_on_marked)  # workers import it from this module
    rep = _run(src, tmp_path / "out", workers=2)
    assert (rep.added, rep.rejected) == (3, 1)
    (r,) = map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())
    assert r["kind"] == "worker_died" and "SIGKILL" in r["reason"] and not r["transient"]
    assert verify(tmp_path / "out", decode=False).ok


def test_decoding_keeps_frames_at_a_size_bounded_by_the_output(tmp_path):
    from echofm.loaders.sources import discover, load_clip

    _video(tmp_path / "big.mp4", seed=1, frames=12, h=480, w=640)
    (clip,) = discover(tmp_path / "big.mp4").clips
    keep = IngestConfig(size=64).keep_side  # 3 x the output: shrunk frame by frame while decoding
    dec = load_clip(clip, short_side=keep)
    assert keep == 192 and dec.frames.shape == (12, 192, 256) and dec.source_size == (480, 640)
    assert dec.scale == pytest.approx(192 / 480) and dec.problems == ""
    meta = json.loads(next(iter_tar_samples(next((_run(tmp_path / "big.mp4", tmp_path / "o"), tmp_path / "o")[1]
                                                  .glob("*.tar"))))[1]["json"])
    y0, y1, x0, x1 = meta["sector_box"]  # reported in source pixels
    assert meta["source_size"] == [480, 640] and 0 <= y0 < y1 <= 480 and 0 <= x0 < x1 <= 640 and x1 - x0 > 320


def test_unlisted_and_oddly_named_videos_are_reported(tmp_path):
    d = tmp_path / "csvdir"
    d.mkdir()
    for name in ("listed.mp4", "forgotten.avi"):
        _video(d / name, seed=len(name), container=name[-3:])
    (d / "labels.csv").write_text("path,patient\nlisted.mp4,p1\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    _video(plain / "a.mp4", seed=5)
    shutil.copy(plain / "a.mp4", plain / "clip.mpg")
    _video(plain / "export.mp4", seed=6)
    (plain / "export.mp4").rename(plain / "export.txt")  # a valid video under a .txt name
    (plain / "notes.txt").write_text("not a video")
    (plain / "scan.xyz").write_text("not a video either")
    rep = _run([d, plain], tmp_path / "out")
    q = rep.quality
    # listed.mp4, a.mp4, export.txt; clip.mpg repeats a.mp4; forgotten.avi is not in labels.csv
    assert (rep.added, rep.duplicates, q.unlisted, q.renamed, q.ignored) == (3, 1, 1, 1, {".xyz": 1})
    assert any("not listed" in w for w in q.warnings) and any("unexpected file extension" in w for w in q.warnings)


def test_quality_report_is_written_and_warns_about_empty_splits(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(3):
        _video(src / f"c{i}.mp4", seed=i, frames=40)
    (src / "labels.csv").write_text("path,patient,split\n" + "".join(f"c{i}.mp4,p{i},train\n" for i in range(3)))
    out = tmp_path / "out"
    rep = _run(src, out)
    saved = json.loads((out / "quality_report.json").read_text())
    assert saved == json.loads(json.dumps(rep.quality.to_dict()))
    c = saved["corpus"]
    assert c["clips"] == 3 and c["splits"] == {"train": 3, "val": 0, "test": 0}
    assert c["resolution"] == {"72x64": 3} and c["fps"] == {"25.0": 3} and c["length"] == {"32-63": 3}
    metas = [json.loads(cc["json"]) for s in read_manifest(out)["shards"] for _, cc in iter_tar_samples(out / s["tar"])]
    assert c["period_found_pct"] == round(100 * sum(x["period"] is not None for x in metas) / 3, 1)
    assert c["crop_fraction_mean"] == round(sum(x["crop_fraction"] for x in metas) / 3, 4) < 0.5
    assert "split 'val' is empty" in saved["warnings"] and "split 'test' is empty" in saved["warnings"]
    m = read_manifest(out)
    assert sum(s["stats"]["clips"] for s in m["shards"]) == 3  # the corpus figures are the manifest's


def test_dry_run_measures_and_writes_nothing(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(2):
        _video(src / f"c{i}.mp4", seed=i, frames=40)
    out = tmp_path / "out"
    rep = _run(src, out, dry_run=True)
    assert not out.exists() and not ids.default_key_path(out).exists()
    assert rep.added == 2 and rep.shards == [] and rep.quality.dry_run
    assert rep.quality.corpus.clips == 2 and sum(rep.quality.splits.values()) == 2
    assert "dry run" in "\n".join(rep.quality.lines())
