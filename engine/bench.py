"""What the benchmark scripts (benchmarks/*.py, run by `echofm bench NAME`) share: where their
results and caches go, and the provenance every results JSON carries.

- Results of an ad-hoc run go to a fresh run folder, `runs/bench/<name>-<YYYYmmdd-HHMMSS>/`
  under the working directory. The committed files in benchmarks/results/ are written only
  when `--out` names them.
- Caches (synthetic corpora, their shards, videos extracted from shards) live in
  `$XDG_CACHE_HOME/echofm/bench/<name>/` (default `~/.cache/echofm/bench/<name>/`). A
  script prints its cache's path and size when it ends; `echofm bench --clean [NAME]`
  removes them. A user's shard folders (`--shards-*`) are only read, never written.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .provenance import provenance

RUNS = Path("runs") / "bench"
"""Run folders of ad-hoc benchmark runs, relative to the working directory."""


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/echofm` (default ~/.cache/echofm)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "echofm"


def cache_dir(name: str) -> Path:
    """Where benchmark `name` keeps what it builds once and reuses (not created here)."""
    return cache_root() / "bench" / name


def run_dir(name: str, root: Path = RUNS) -> Path:
    """A new folder `root/<name>-<timestamp>/` for one run's results (created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = Path(root) / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{root}: no free run folder name for {name}-{stamp}")


def results_path(name: str, out: str | Path | None, filename: str) -> Path:
    """`out` when given (e.g. benchmarks/results/<filename>, to update the committed
    results), else `<new run folder>/<filename>`."""
    return Path(out) if out else run_dir(name) / filename


def write_json(path: str | Path, results: dict, recipe=None) -> Path:
    """results + {"provenance": ...} -> path (parents created); prints where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "provenance": provenance(recipe)}, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def announce_cache(path: str | Path) -> str:
    """Print (and return) the cache line: path, size and how to remove it."""
    path = Path(path)
    line = (f"cache: {path} ({folder_bytes(path) / 2**20:.0f} MB; reused by the next run; "
            "`echofm bench --clean` removes it)") if path.exists() else f"cache: none kept ({path} does not exist)"
    print(line, flush=True)
    return line


def clean(names: list[str] | None = None) -> list[tuple[Path, int]]:
    """Remove the benchmark caches of `names` (all when None, also the older
    `~/.cache/echofm/bench_<name>` folders) -> [(removed folder, bytes freed)]."""
    root = cache_root()
    if names:
        targets = [cache_dir(n) for n in names] + [root / f"bench_{n}" for n in names]
    else:
        targets = [root / "bench", *sorted(root.glob("bench_*"))]
    removed = []
    for t in targets:
        if t.is_dir():
            size = folder_bytes(t)
            shutil.rmtree(t)
            removed.append((t, size))
    return removed
