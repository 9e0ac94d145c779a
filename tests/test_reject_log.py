"""Rejected files are locatable by whoever ran the ingest: the console names them (relative
paths, the first 20, then a count), `<out>.rejects.jsonl` beside the shard folder keeps
every one with its reason, and the shard folder's rejects.jsonl stays path-free."""
from __future__ import annotations

import json
import warnings

from echofm.engine.cli import main
from echofm.loaders.reject_log import CONSOLE_CAP, console_lines, log_path, rejected_file, shown_path


def test_console_and_local_log_name_every_rejected_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "incoming" / "site a"
    src.mkdir(parents=True)
    names = [f"patient{i:02d}.mp4" for i in range(CONSOLE_CAP + 3)]
    for n in names:
        (src / n).write_bytes(b"not a video " * (50 + len(n)) + n.encode())  # distinct content each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ingest", "incoming", "--out", "shards", "--size", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line for line in out if line.startswith("ingest: rejected: incoming/")]
    assert len(listed) == CONSOLE_CAP
    assert all(line.split(" (")[0].removeprefix("ingest: rejected: ").startswith("incoming/site a/patient")
               for line in listed)
    log = tmp_path / "shards.rejects.jsonl"
    assert f"ingest: rejected: ... and 3 more; the full list with reasons: {log}" in out
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == [str(src / n) for n in names]
    assert all(r["kind"] and r["reason"] and r["transient"] is False for r in rows)
    shard_rejects = (tmp_path / "shards" / "rejects.jsonl").read_text()
    assert "patient" not in shard_rejects and str(tmp_path) not in shard_rejects  # still path-free
    by_hash = {json.loads(x)["source"] for x in shard_rejects.splitlines()}
    assert {r["source"] for r in rows} == by_hash  # the log's hash finds the shard folder's line
    assert log_path(tmp_path / "shards") == log and not (tmp_path / "shards" / log.name).exists()


def test_dry_run_lists_but_writes_no_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.mp4").write_bytes(b"junk" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ingest", "in", "--out", "s", "--size", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ingest: rejected: in/x.mp4 (" in out and not (tmp_path / "s.rejects.jsonl").exists()


def test_console_lines_cap_and_paths_outside_the_current_folder(tmp_path):
    files = [rejected_file(str(tmp_path / f"f{i}.mp4"), "decode", "no frames", False, f"h{i}") for i in range(3)]
    log = tmp_path / "s.rejects.jsonl"
    assert console_lines(files, log, cap=2) == [
        f"rejected: {shown_path(str(tmp_path / 'f0.mp4'))} (decode: no frames)",
        f"rejected: {shown_path(str(tmp_path / 'f1.mp4'))} (decode: no frames)",
        f"rejected: ... and 1 more; the full list with reasons: {log}"]
    assert console_lines(files[:1], log)[-1] == f"rejected files are listed in {log}"
    assert console_lines([], log) == []
    assert shown_path("/elsewhere/a.mp4", cwd=str(tmp_path)) == "/elsewhere/a.mp4"
    assert shown_path(str(tmp_path / "d" / "a.mp4"), cwd=str(tmp_path)) == "d/a.mp4"
