"""The downstream bar: after a short CPU pretraining, the linear probe on the pretrained
echofm_tiny beats the same probe on a random-init backbone (view accuracy, EF MAE) on
held-out patients. Pretraining dominates the cost (minutes on 2 cores), so this test runs
only with ECHOFM_SLOW=1 (`slow` marker); the demo (`echofm demo`) reports the same
comparison every run.

Status: this bar is NOT met (issue 8 is marked blocked), so the test is a strict xfail: with
ECHOFM_SLOW=1 it runs and is reported as xfailed while the gap stands, and the day it passes
the run fails (XPASS strict) so that the mark is removed. `benchmarks/probe_gap.py` shows
why: after 600 or 3,000 CPU steps no layer or pooling of the pretrained encoder beats the
random init beyond noise, and EF sits at the chance floor for both, while a linear head on
raw pixel statistics does far better (results in benchmarks/results/probe_gap.json)."""
import pytest

VIDEOS, STEPS, SEED = 160, 600, 11


@pytest.mark.slow(reason="pretrains echofm_tiny for minutes")
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known gap (issue 8): the pretrained probe does not beat the random init beyond noise")
def test_pretrained_probe_beats_random_init(tmp_path):
    from echofm.engine.config import load_recipe
    from echofm.engine.downstream.probe import compare_backbones, paired_gap
    from probe_report import bar_verdict, format_comparison
    from echofm.engine.export import export
    from echofm.engine.trainer import pretrain
    from echofm.loaders.corpus import cached_corpus
    from echofm.loaders.ingest import IngestConfig
    from echofm.loaders.synth import SynthConfig

    shards = cached_corpus(SynthConfig(videos=VIDEOS, seed=SEED, min_size=128, max_size=160, min_frames=40,
                                       max_frames=64, val_fraction=0.15, test_fraction=0.35),
                           IngestConfig(size=112, codec="vp9", progress=False), tmp_path)
    recipe = load_recipe("recipes/pretrain/echofm_tiny.yaml", [
        f"data.shards={shards}", "data.batch_size=8", f"train.out_dir={tmp_path / 'runs'}",
        f"train.steps={STEPS}", "train.checkpoint_every=0", "optim.lr=1.5e-3", "schedule.warmup_steps=30",
        "logging.tensorboard=false", "logging.progress=false", "downstream.bootstrap=200"])
    summary = pretrain(recipe)
    export(summary["run_dir"], tmp_path / "export")
    # The training checkpoint and its export are the same backbone.
    from echofm.engine.downstream.backbone import load_backbone

    assert (load_backbone(summary["run_dir"], recipe)[1]["fingerprint"]
            == load_backbone(str(tmp_path / "export"), recipe)[1]["fingerprint"])
    res = compare_backbones({"pretrained": str(tmp_path / "export"), "random": "random"}, recipe,
                            tasks=("view", "ef"), log=print)
    print(format_comparison(res))
    print(bar_verdict(res))
    # "A margin that is not noise": the paired patient-bootstrap 95% CI of the gap
    # (same test videos for both backbones) lies above zero.
    for task in ("view", "ef"):
        gap = paired_gap(res, task)
        assert gap["ci_low"] > 0, (task, gap)
