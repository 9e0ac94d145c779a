"""Synthetic corpus -> shards, built once per content key: the cache the tests, the demo and
the benchmarks share.

A synthetic corpus depends on its `SynthConfig` and on the code that renders it; its shards
also on the ingest settings and the code that writes them. A folder is reused only when the
spec it records (`cache_spec.json`: every setting that changes the output plus a digest of
that code) equals the one asked for, so a changed setting or a changed writer builds afresh
instead of silently serving stale data. By default the folder names carry a hash of the
spec (several corpora side by side); fixed names (the demo's `corpus/`, `shards/`) are
rebuilt in place when the spec changes.

    from echofm.loaders.corpus import cached_corpus
    shards = cached_corpus(SynthConfig(videos=48, seed=0), IngestConfig(size=112), cache_dir)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from . import ids
from .errors import DataError

SPEC = "cache_spec.json"
SYNTH_CODE = ("synth", "video_io")
"""Modules (files or packages under loaders/) whose code decides the bytes of a synthetic corpus."""
INGEST_CODE = ("ingest", "ingest_config", "ingest_clip", "shards", "video_io", "sector", "cycles", "trim", "sources", "ids", "corpus")
"""... and of its shards."""
NOT_OUTPUT = ("workers", "progress")
"""Settings that change how fast a corpus is made, not what it holds."""


def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 of the source of `echofm.loaders.<module>` (a .py file, or every .py of a package)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for m in modules:
        files = [root / f"{m}.py"] + sorted((root / m).rglob("*.py"))
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def spec_of(cfg) -> dict:
    """A config dataclass as JSON-safe data, without the settings that do not change the output."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {k: v for k, v in data.items() if k not in NOT_OUTPUT}


def key_of(spec: dict) -> str:
    """12 hex digits of the spec's sha256."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def cached_synth(cfg, cache_dir: str | Path, *, folder: str | None = None, log=print) -> Path:
    """The synthetic corpus of `cfg` (loaders.synth.SynthConfig) under `cache_dir` (labels.csv,
    videos/, masks/), made once per spec -> its folder (default name: synth_<videos>_<key>)."""
    from .synth import make_corpus

    spec = {"synth": spec_of(cfg), "code": code_digest(SYNTH_CODE)}
    out = Path(cache_dir) / (folder or f"synth_{cfg.videos}_{key_of(spec)}")

    def build(path: Path) -> None:
        log(f"  synth: {cfg.videos} videos -> {path}")
        make_corpus(path, cfg)

    return _ensure(out, spec, build)


def cached_corpus(synth_cfg, ingest_cfg, cache_dir: str | Path, *, folders: tuple[str, str] | None = None,
                  log=print) -> Path:
    """Synthetic corpus (`synth_cfg`) -> shards (`ingest_cfg`, loaders.ingest.IngestConfig)
    under `cache_dir`, each built once per spec -> the shard folder.

    folders: fixed (corpus, shards) folder names instead of the content-keyed ones."""
    from .ingest import ingest

    src = cached_synth(synth_cfg, cache_dir, folder=folders[0] if folders else None, log=log)
    spec = {"corpus": json.loads((src / SPEC).read_text())["spec"], "ingest": spec_of(ingest_cfg),
            "code": code_digest(INGEST_CODE)}
    name = folders[1] if folders else f"shards_{ingest_cfg.size}_{synth_cfg.videos}_{key_of(spec)}"

    def build(path: Path) -> None:
        log(f"  ingest: {src} -> {path} ({ingest_cfg.codec}, {ingest_cfg.size}^2)")
        if ingest_cfg.id_key is None:
            _synthetic_id_key(ids.default_key_path(path), spec["corpus"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sizes < 128 px are intended for CPU corpora
            report = ingest([src], path, ingest_cfg)
        if not report.added and not report.skipped:
            raise DataError(f"{path}: nothing was ingested from {src} ({report.rejected} rejected; "
                            f"see {path / 'rejects.jsonl'})")

    return _ensure(Path(cache_dir) / name, spec, build)


def _synthetic_id_key(path: Path, corpus_spec: dict) -> None:
    """A synthetic corpus's id key, derived from the corpus's spec instead of drawn at random:
    the same corpus then gets the same patient and study hashes on every machine and run, so
    seeded draws over patients (label fractions) repeat. Written before every (re)build: a
    resumed build derives the same key, a rebuild for another corpus its own. Synthetic
    patients have no privacy to protect; real corpora keep a random key (loaders/ids.py)."""
    seed = json.dumps(corpus_spec, sort_keys=True).encode()
    path.write_text(hashlib.sha256(b"echofm synthetic id key\0" + seed).hexdigest() + "\n")


def _ensure(folder: Path, spec: dict, build: Callable[[Path], None]) -> Path:
    """`folder` holding what `spec` describes: reused when its recorded spec is that one and
    complete; (re)built otherwise. A folder of another spec is emptied first; one without a
    spec file is not ours and is refused (a DataError naming it)."""
    try:
        state = json.loads((folder / SPEC).read_text())
    except FileNotFoundError:
        state = None
    except ValueError:
        state = {"spec": None, "complete": False}
    if state == {"spec": spec, "complete": True}:
        return folder
    if folder.is_dir() and any(folder.iterdir()):
        if state is None:
            raise DataError(f"{folder}: exists and was not built by echofm.loaders.corpus (no {SPEC}); "
                            "move it away or pick another folder")
        if state["spec"] != spec:
            shutil.rmtree(folder)  # built from other settings or code
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, spec, complete=False)  # a killed build resumes (ingest skips what it has)
    build(folder)
    _write(folder, spec, complete=True)
    return folder


def _write(folder: Path, spec: dict, *, complete: bool) -> None:
    tmp = folder / (SPEC + ".tmp")
    tmp.write_text(json.dumps({"spec": spec, "complete": complete}, sort_keys=True))
    tmp.replace(folder / SPEC)
