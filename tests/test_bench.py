"""`echofm bench`: an ad-hoc run writes to its own run folder (the committed results only with
--out), caches live in the cache folder, are announced and cleaned, and a user's shard folder
is only read."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from echofm.engine import bench
from echofm.engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_adhoc_run_writes_a_run_folder_not_the_committed_results(tmp_path, monkeypatch, capsys):
    committed = ROOT / "benchmarks" / "results" / "synth.json"
    before = committed.read_bytes()
    monkeypatch.chdir(tmp_path)
    args = ["bench", "synth", "--videos", "2", "--workers", "1", "--frames", "40-44", "--size", "64-64"]
    assert main(args) == 0
    assert committed.read_bytes() == before
    (run,) = (tmp_path / "runs" / "bench").iterdir()
    assert run.name.startswith("synth-")
    res = json.loads((run / "synth.json").read_text())
    assert res["videos"] == 2 and res["provenance"]["git"]["commit"]
    assert f"wrote {Path('runs') / 'bench' / run.name / 'synth.json'}" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "mine.json")]) == 0  # an explicit --out is honoured
    assert json.loads((tmp_path / "mine.json").read_text())["videos"] == 2
    assert len(list((tmp_path / "runs" / "bench").iterdir())) == 1


def test_every_benchmark_writes_results_only_where_told():
    """No script defaults its output to benchmarks/results/."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        assert '/ "results"' not in text and "DEFAULT_OUT" not in text, f"{path.name} defaults to benchmarks/results"
        assert ".cache" not in text or "bench.cache_dir" in text, f"{path.name} keeps a cache outside bench.cache_dir"


def test_caches_are_announced_and_cleaned(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    loader = bench.cache_dir("loader")
    assert loader == tmp_path / "echofm" / "bench" / "loader"
    (loader / "x").mkdir(parents=True)
    (loader / "x" / "f.bin").write_bytes(b"\0" * 3 * 2**20)
    legacy = tmp_path / "echofm" / "bench_ingest"  # the folders older versions left
    legacy.mkdir()
    (legacy / "g.bin").write_bytes(b"\0" * 2**20)
    keep = tmp_path / "echofm" / "other"
    keep.mkdir()
    assert bench.announce_cache(loader) == (f"cache: {loader} (3 MB; reused by the next run; "
                                            "`echofm bench --clean` removes it)")
    assert main(["bench", "--clean", "ingest"]) == 0
    assert not legacy.exists() and loader.exists()
    assert main(["bench", "--clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed {legacy} (1 MB)" in out and f"removed {tmp_path / 'echofm' / 'bench'} (3 MB)" in out
    assert not loader.exists() and keep.exists()
    assert main(["bench", "--clean"]) == 0 and "no benchmark caches" in capsys.readouterr().out


def test_loader_extracts_videos_into_the_cache_not_the_shards(tiny_shards, tmp_path):
    """Regression: `bench loader --shards-112 DIR` wrote DIR/extracted/."""
    loader = _script("loader")
    before = sorted(p.name for p in tiny_shards.iterdir())
    videos = loader.extract_videos(tiny_shards, tmp_path / "cache")
    assert sorted(p.name for p in tiny_shards.iterdir()) == before
    m = json.loads((tiny_shards / "manifest.json").read_text())
    assert len(videos) == m["total_samples"]
    assert all(Path(p).is_relative_to(tmp_path / "cache" / "extracted") and Path(p).stat().st_size for p, _ in videos)
    assert sum(n for _, n in videos) == m["total_frames"]


def test_bench_without_a_name_says_what_to_pass(capsys):
    assert main(["bench"]) == 2
    assert "bench: name a benchmark (synth, ingest" in capsys.readouterr().err
