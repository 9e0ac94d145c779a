"""Benchmark corpora cached on disk, keyed by what they are made of (not by a folder name).

A synthetic corpus depends on its `SynthConfig` and on the code that renders it; its shards
also on the ingest settings and the code that writes them. The folder names carry a hash
of all of that, and each folder records the spec it was built from (`cache_spec.json`),
so a changed setting or a changed writer builds a fresh corpus instead of silently serving
stale shards (the old `shards_<size>_<videos>` names did).

    from corpus_cache import cached_shards          # benchmarks/ is on sys.path for scripts
    shards = cached_shards(cache, SynthConfig(videos=48, seed=0), IngestConfig(size=112))
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

SPEC = "cache_spec.json"
# Modules whose code decides the bytes of a synthetic corpus / of its shards.
SYNTH_CODE = ("synth", "synth_dicom", "video_io")
INGEST_CODE = ("ingest", "shards", "video_io", "sector", "cycles", "trim")
NOT_OUTPUT = ("workers", "progress")
"""Settings that change how fast a corpus is made, not what it holds."""


def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 of the source of `echofm.loaders.<module>` files (and of loaders/sources/)."""
    import echofm.loaders as pkg

    root = Path(pkg.__file__).parent
    files = [root / f"{m}.py" for m in modules] + sorted((root / "sources").glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def spec_of(cfg) -> dict:
    """A config dataclass as JSON-safe data, without the settings that do not change the output."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg), default=str)).items()
            if k not in NOT_OUTPUT}


def key_of(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _ready(folder: Path, spec: dict, marker: str) -> bool:
    try:
        return (folder / marker).exists() and json.loads((folder / SPEC).read_text()) == spec
    except (OSError, ValueError):
        return False


def cached_shards(cache: Path, synth_cfg, ingest_cfg, *, log=print) -> Path:
    """Synthetic corpus (`synth_cfg`) -> shards (`ingest_cfg`) under `cache`, built once per
    content key -> the shard folder."""
    from echofm.loaders.ingest import ingest
    from echofm.loaders.synth import make_corpus

    synth_spec = {"synth": spec_of(synth_cfg), "code": code_digest(SYNTH_CODE)}
    src = cache / f"synth_{synth_cfg.videos}_{key_of(synth_spec)}"
    if not _ready(src, synth_spec, "labels.csv"):
        log(f"  synth: {synth_cfg.videos} videos -> {src}")
        make_corpus(src, synth_cfg)
        (src / SPEC).write_text(json.dumps(synth_spec, sort_keys=True))
    shard_spec = {"corpus": synth_spec, "ingest": spec_of(ingest_cfg), "code": code_digest(INGEST_CODE)}
    out = cache / f"shards_{ingest_cfg.size}_{synth_cfg.videos}_{key_of(shard_spec)}"
    if not _ready(out, shard_spec, "manifest.json"):
        log(f"  ingest: {src} -> {out} ({ingest_cfg.codec}, {ingest_cfg.size}^2)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ingest([src], out, ingest_cfg)
        (out / SPEC).write_text(json.dumps(shard_spec, sort_keys=True))
    return out
