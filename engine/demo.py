"""`echofm demo`: the main job end to end on a CPU, on embedded defaults.

    synthetic corpus (loaders.synth) -> ingest (VP9 shards, 112^2) -> pretrain echofm_tiny
    (DeepSpeed, one process) -> export (model.safetensors + config.json) -> linear probes of
    the pretrained vs a random-init backbone (view and EF) -> a summary of where things are.

Every stage is resumable: a re-run reuses the corpus and shards while their settings are
the same (loaders/corpus.py records them; other settings rebuild them), continues
pretraining from the newest checkpoint (`--resume auto`) and re-exports. Sized to finish in under 10
minutes on 2 cores: measured 2.7 minutes (corpus 8 s, ingest 12 s, pretraining 600 steps
110 s, probes 33 s) on a shared 2-core machine.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from echofm.loaders.synth import SynthConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "echofm_tiny.yaml"


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Sizes of the demo run (defaults: < 10 minutes on 2 CPU cores)."""

    out: str = "demo_out"
    """Working folder: corpus/, shards/, runs/, export/, downstream/, demo_summary.json."""
    videos: int = 192
    """Synthetic videos (patients hold 1-3 views; split train/val/test by patient)."""
    steps: int = 600
    """Pretraining steps of echofm_tiny (batch 4, 16 x 112^2; ~0.2-0.3 s each on 2 cores)."""
    test_fraction: float = 0.3
    """Share of patients held out for the probes' test split."""
    probe: bool = True
    """Run the linear probes (pretrained vs random) when the downstream package is there."""
    seed: int = 0


def demo_synth_config(cfg: DemoConfig) -> SynthConfig:
    """The demo's synthetic corpus (`loaders.synth.SynthConfig`); benchmarks/supervised_ref.py
    builds the same one. Small frames and clips keep generation and ingest short; the
    held-out split is large because the comparison's CI is over test patients."""
    from echofm.loaders.synth import SynthConfig

    return SynthConfig(videos=cfg.videos, seed=cfg.seed, min_size=128, max_size=192, max_frames=90,
                       test_fraction=cfg.test_fraction)


def _stage(name: str, t0: float) -> float:
    now = time.time()
    print(f"[demo] {name}: {now - t0:.1f} s", flush=True)
    return now


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes to `<out>/demo_summary.json`) the summary."""
    from echofm.loaders.corpus import cached_corpus, cached_synth
    from echofm.loaders.ingest import IngestConfig

    from .config import load_recipe
    from .export import export
    from .provenance import provenance
    from .trainer import pretrain

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = t = time.time()
    times: dict[str, float] = {}

    synth = demo_synth_config(cfg)

    def say(message: str) -> None:
        print(f"[demo] {message.strip()}", flush=True)

    print(f"[demo] 1/5 synthetic corpus: {cfg.videos} videos -> {out / 'corpus'}", flush=True)
    corpus = cached_synth(synth, out, folder="corpus", log=say)  # reused while its settings stay the same
    t2 = _stage("corpus", t)
    times["corpus_s"], t = t2 - t, t2

    print(f"[demo] 2/5 ingest -> {out / 'shards'} (VP9, 112 x 112)", flush=True)
    shards = cached_corpus(synth, IngestConfig(size=112, codec="vp9", progress=False), out,
                           folders=("corpus", "shards"), log=say)
    t2 = _stage("ingest", t)
    times["ingest_s"], t = t2 - t, t2

    overrides = [f"data.shards={shards}", f"train.out_dir={out / 'runs'}", f"train.steps={cfg.steps}",
                 f"train.seed={cfg.seed}", f"train.checkpoint_every={max(cfg.steps // 3, 1)}",
                 f"logging.plot_every={max(cfg.steps // 3, 1)}"]
    recipe = load_recipe(RECIPE, overrides)
    recipe.validate()
    print(f"[demo] 3/5 pretrain {recipe.name}: {cfg.steps} steps, batch {recipe.data.batch_size}, "
          f"{recipe.data.num_frames} x {recipe.data.size}^2 (DeepSpeed, CPU)", flush=True)
    summary = pretrain(recipe, resume="auto")
    t2 = _stage("pretrain", t)
    times["pretrain_s"], t = t2 - t, t2

    weights = out / "export"
    export(summary["run_dir"], weights)
    t2 = _stage(f"4/5 export -> {weights}", t)
    times["export_s"], t = t2 - t, t2

    probe = None
    if cfg.probe:
        probe = _probe(recipe, weights, out)
        t2 = _stage("5/5 linear probes", t)
        times["probe_s"], t = t2 - t, t2
    times["total_s"] = time.time() - t_start

    run_dir = Path(summary["run_dir"])
    result = {
        "corpus": str(corpus), "shards": str(shards), "run_dir": str(run_dir),
        "metrics": str(run_dir / "metrics.jsonl"), "tensorboard": str(run_dir / "tb"),
        "figures": str(run_dir / "figures"), "checkpoint": summary["last_checkpoint"],
        "weights": str(weights), "pretrain": summary, "probe": probe,
        "seconds": {k: round(v, 1) for k, v in times.items()}, "provenance": provenance(recipe),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1, default=str))
    _print_summary(result)
    return result


def _probe(recipe, weights: Path, out: Path) -> dict | None:
    """Linear probes (view, EF) of the exported backbone and a random init on the demo shards."""
    try:
        from .downstream.probe import compare_backbones
    except ImportError as e:
        print(f"[demo] 5/5 linear probes skipped: the downstream package is not importable ({e})")
        return None
    recipe.downstream.out_dir = str(out / "downstream")
    recipe.downstream.bootstrap = 200
    print("[demo] 5/5 linear probes: pretrained vs random init (view, EF)", flush=True)
    res = compare_backbones({"pretrained": str(weights), "random": "random"}, recipe, tasks=("view", "ef"))
    (out / "downstream").mkdir(parents=True, exist_ok=True)
    (out / "downstream" / "demo_probe.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _print_summary(r: dict) -> None:
    p, s = r["pretrain"], r["seconds"]
    lines = [
        "",
        "EchoFM demo done in {:.0f} s".format(s["total_s"]),
        f"  corpus        {r['corpus']}",
        f"  shards        {r['shards']}",
        f"  pretraining   {p['steps']} steps, loss {p['first_loss']:.4f} -> {p['last_loss']:.4f}"
        if p.get("first_loss") is not None else f"  pretraining   {p['steps']} steps (already complete)",
        f"  metrics       {r['metrics']}  (tensorboard --logdir {r['tensorboard']})",
        f"  figures       {r['figures']}",
        f"  checkpoint    {r['checkpoint']}",
        f"  weights       {r['weights']}  (EchoFM.from_pretrained)",
    ]
    if r["probe"]:
        from .downstream.probe import bar_verdict, format_comparison

        lines.append("  linear probes, held-out test patients (value [95% CI, bootstrap over patients]):")
        lines += ["    " + row for row in format_comparison(r["probe"]).splitlines()]
        lines.append("  " + bar_verdict(r["probe"]))
    lines.append("  seconds       " + ", ".join(f"{k[:-2]} {v}" for k, v in s.items()))
    print("\n".join(lines), flush=True)
