"""`echofm demo`: the main job end to end on a CPU, on embedded defaults.

    synthetic corpus (loaders.synth) -> ingest (VP9 shards, 112^2) -> pretrain echofm_tiny
    (the paper's loss terms with the centred S, DeepSpeed, one process; the collapse monitor
    in its metrics) -> export (model.safetensors + config.json) -> evaluation of the
    pretrained vs a random-init backbone:
      - cycle-phase retrieval of the per-slice phase embeddings (and a pixel baseline): what
        the periodic objective is for, the first line of the verdict;
      - full fine-tune (layer-wise lr decay, the finetune engine, early stopping on the val
        split) at 10% and 100% of the training patients' labels, view and EF, same seeds,
        splits and epoch budget for both;
      - linear probes (secondary line);
    -> a summary: each comparison with the paired patient-bootstrap CI of the difference
    (pretrained - random), and the supervised ceiling (benchmarks/results/supervised_ref.json).
    benchmarks/ablation.py reuses these stages for the objective ablation.

Every stage is resumable: a re-run reuses the corpus and shards while their settings are
the same (loaders/corpus.py records them; other settings rebuild them), continues
pretraining and each fine-tune from its newest checkpoint (`--resume auto`) and re-exports.
Sized to finish in under 6 minutes on 2 cores (README has the measured stage times).
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
CEILING = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "supervised_ref.json"
"""The supervised reference (benchmarks/supervised_ref.py: a 3D CNN from scratch with all
labels, and chance) on the demo's corpus: the ceiling and floor the summary quotes."""
BACKBONES = ("pretrained", "random")
TASKS = ("view", "ef")


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Sizes of the demo run (defaults: < 6 minutes on 2 CPU cores)."""

    out: str = "demo_out"
    """Working folder: corpus/, shards/, runs/, export/, downstream/, demo_summary.json."""
    videos: int = 192
    """Synthetic videos (patients hold 1-3 views; split train/val/test by patient)."""
    steps: int = 600
    """Pretraining steps of echofm_tiny (batch 4, 16 x 112^2; ~0.2-0.3 s each on 2 cores)."""
    test_fraction: float = 0.3
    """Share of patients held out for the test split (the CIs are over test patients)."""
    fractions: tuple[float, ...] = (0.1, 1.0)
    """Fine-tune label fractions (of training patients, stratified, seeded)."""
    finetune_epochs: tuple[int, ...] = (12, 1)
    """Most fine-tune epochs at each of `fractions` (the same for both backbones); each
    fine-tune keeps its best epoch on the val split and stops after `patience` epochs
    without a better one (`FINETUNE`; the choice is documented there). At 100% one epoch
    (24 steps): two cost ~100 CPU s more, past the demo's 6-minute budget."""
    patience: int = 2
    """Early stopping: epochs without a better val score before a fine-tune stops."""
    min_delta: float = 0.005
    """Early stopping: a val score is better only by more than this share of the best so
    far (EF MAE 14.8 -> 14.7, not 14.81: such drifts kept runs going for 12 epochs)."""
    test_clips: int = 1
    """Clips per val / test video (predictions averaged) in the probe, fine-tune and phase
    scores; the probes' training features take one clip per video too."""
    phase: bool = True
    """Run the cycle-phase retrieval (pretrained vs random vs pixels)."""
    phase_clips: int = 2
    """Clips per test video for the phase retrieval (more clips: more beats to match)."""
    seed: int = 0

    def validate(self) -> None:
        if len(self.fractions) != len(self.finetune_epochs):
            raise ValueError(f"fractions {self.fractions} and finetune_epochs {self.finetune_epochs} "
                             "must have the same length")
        if any(not 0 < f <= 1 for f in self.fractions) or any(e < 0 for e in self.finetune_epochs):
            raise ValueError("fractions must be in (0, 1] and finetune_epochs >= 0 (0: skip)")


def demo_synth_config(cfg: DemoConfig) -> SynthConfig:
    """The demo's synthetic corpus (`loaders.synth.SynthConfig`); benchmarks/supervised_ref.py
    builds the same one. Small frames and clips keep generation and ingest short; the
    held-out split is large because the comparison's CI is over test patients."""
    from echofm.loaders.synth import SynthConfig

    return SynthConfig(videos=cfg.videos, seed=cfg.seed, min_size=128, max_size=192, max_frames=90,
                       test_fraction=cfg.test_fraction)


class _Clock:
    """Stage timer: wall and CPU seconds of each stage (the machine is shared: CPU seconds
    say what the demo itself costs)."""

    def __init__(self):
        self.t0 = self.t = time.time()
        self.c0 = self.c = time.process_time()
        self.seconds: dict[str, float] = {}

    def stage(self, name: str, label: str = "") -> None:
        now, cpu = time.time(), time.process_time()
        self.seconds[f"{name}_s"] = round(now - self.t, 1)
        self.seconds[f"{name}_cpu_s"] = round(cpu - self.c, 1)
        print(f"[demo] {label or name}: {now - self.t:.1f} s ({cpu - self.c:.1f} CPU s)", flush=True)
        self.t, self.c = now, cpu

    def total(self) -> dict[str, float]:
        return dict(self.seconds, total_s=round(time.time() - self.t0, 1),
                    total_cpu_s=round(time.process_time() - self.c0, 1))


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes to `<out>/demo_summary.json`) the summary."""
    from .export import export
    from .provenance import provenance
    from .trainer import pretrain

    cfg.validate()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    corpus, shards = _data(cfg, out, clock)
    recipe = _recipe(cfg, out, shards)
    print(f"[demo] 3/7 pretrain {recipe.name} ({recipe.loss.variant} objective): {cfg.steps} steps, batch "
          f"{recipe.data.batch_size}, {recipe.data.num_frames} x {recipe.data.size}^2 (DeepSpeed, CPU)", flush=True)
    summary = pretrain(recipe, resume="auto")
    clock.stage("pretrain")
    weights = out / "export"
    export(summary["run_dir"], weights)
    clock.stage("export", f"4/7 export -> {weights}")
    specs = backbone_specs(weights)
    phase = _phase(cfg, recipe, specs) if cfg.phase else None
    clock.stage("phase", "5/7 phase retrieval")
    print("[demo] 6/7 linear probes: pretrained vs random init (view, EF; the fine-tunes start from these heads)",
          flush=True)
    probe, heads = _probes(cfg, recipe, specs)
    clock.stage("probe", "6/7 linear probes")
    finetune, raw = _finetune_all(cfg, recipe, specs, out, heads)
    clock.stage("finetune", "7/7 fine-tunes")
    run_dir = Path(summary["run_dir"])
    result = {
        "corpus": str(corpus), "shards": str(shards), "run_dir": str(run_dir),
        "metrics": str(run_dir / "metrics.jsonl"), "tensorboard": str(run_dir / "tb"),
        "figures": str(run_dir / "figures"), "checkpoint": summary["last_checkpoint"],
        "weights": str(weights), "pretrain": summary, "objective": _objective(recipe),
        "phase_health": phase_health_trace(run_dir / "metrics.jsonl"), "phase": phase,
        "finetune": finetune, "probe": {f: compare(per) for f, per in probe.items()},
        "protocol": protocol(cfg), "ceiling": ceiling(), "seconds": clock.total(), "provenance": provenance(recipe),
    }
    result["bar"] = bar(result["finetune"], chance_floor(result["ceiling"]), phase=phase)
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1, default=str))
    for name, full in (("demo_finetune.json", raw), ("demo_probe.json", probe)):  # per-video predictions
        if full:
            (out / "downstream").mkdir(parents=True, exist_ok=True)
            (out / "downstream" / name).write_text(json.dumps(full, indent=1, default=str))
    print("\n".join(summary_lines(result)), flush=True)
    return result


def _data(cfg: DemoConfig, out: Path, clock: _Clock) -> tuple[Path, Path]:
    """Stages 1-2: the synthetic corpus and its shards (both cached by their settings)."""
    from echofm.loaders.corpus import cached_corpus, cached_synth
    from echofm.loaders.ingest import IngestConfig

    from .config import load_recipe

    def say(message: str) -> None:
        print(f"[demo] {message.strip()}", flush=True)

    synth = demo_synth_config(cfg)
    print(f"[demo] 1/7 synthetic corpus: {cfg.videos} videos -> {out / 'corpus'}", flush=True)
    corpus = cached_synth(synth, out, folder="corpus", log=say)  # reused while its settings stay the same
    clock.stage("corpus")
    # the recipe's clip stride folded in at ingest: the stream then decodes only the frames
    # the clips use (decode waste ~1.1 instead of ~2; docs/data.md)
    stride = load_recipe(RECIPE).data.stride
    fold = {"fold_stride": stride, "gop": 4} if stride > 1 else {}
    print(f"[demo] 2/7 ingest -> {out / 'shards'} (VP9, 112 x 112, stride {stride} folded in)", flush=True)
    shards = cached_corpus(synth, IngestConfig(size=112, codec="vp9", progress=False, **fold), out,
                           folders=("corpus", "shards"), log=say)
    clock.stage("ingest")
    return corpus, shards


def _recipe(cfg: DemoConfig, out: Path, shards: Path, overrides: tuple[str, ...] = ()):
    """echofm_tiny (its objective: centred) on the demo's shards; downstream settings of the
    evaluation stages; `overrides` ("key=value", e.g. the ablation's objective) last."""
    from .config import load_recipe

    every = max(cfg.steps // 3, 1)
    recipe = load_recipe(RECIPE, [
        f"data.shards={shards}", f"train.out_dir={out / 'runs'}", f"train.steps={cfg.steps}",
        f"train.seed={cfg.seed}", f"train.checkpoint_every={every}", f"logging.plot_every={every}",
        f"downstream.out_dir={out / 'downstream'}", "downstream.bootstrap=1000",
        f"downstream.test_clips={cfg.test_clips}", f"downstream.train_clips={cfg.test_clips}",
        f"downstream.seed={cfg.seed}", *overrides])
    recipe.validate()
    return recipe


def phase_health_trace(metrics: Path) -> dict:
    """The collapse monitor's figures (engine/phase_health.py) at the first and last logged
    steps of a pretraining run's metrics.jsonl ({} when it has none)."""
    try:
        rows = [json.loads(ln) for ln in Path(metrics).read_text().splitlines() if '"phase_' in ln]
    except OSError:
        return {}
    pick = {k: v for k, v in (("first", rows[0]), ("last", rows[-1]))} if rows else {}
    return {k: {m: r[m] for m in r if m.startswith("phase_") or m == "step"} for k, r in pick.items()}


def _objective(recipe) -> dict:
    lc = recipe.loss
    return {"variant": lc.variant, "triplet_weight": lc.triplet_weight, "cycle_weight": lc.cycle_weight,
            "mask_ratio": recipe.mask.ratio, "recipe": str(RECIPE.name)}


# ---------------------------------------------------------------- probes and fine-tunes


FINETUNE = {"mode": "finetune", "lr": 1.0e-4, "backbone_lr": 1.0e-5, "layer_decay": 0.75, "warmup_epochs": 0}
"""Fine-tune settings of the demo: head lr, top-layer lr with layer-wise decay, no warmup
(the head starts trained: LP-FT); the finetune engine's AdamW, batch 4, one clip per
labelled video per epoch, each epoch its own cosine cycle (warm restarts), the best epoch
on the val split kept (`_finetune_one`). The lrs are 10x below the finetune recipe's: the
probe head starts near zero training loss, where Adam turns noise-sized gradients into
full-sized steps; at 1e-3 / 1e-4 the training loss went from ~1e-5 to 11-28 within 8 steps
(grad norm 1e4) for both backbones.

The few-label point and schedule (10% of the training patients, 12 epochs at most,
patience 2) were fixed on the random-init arm alone, before any pretrained arm of the
centred objective was scored (benchmarks/lowlabel.py, benchmarks/results/lowlabel.json):
random init beats chance on view there (0.65 vs 0.23); on EF it stays at or above the
mean predictor's MAE at every fraction, 100% included, so no few-label point can give EF
a random arm that beats chance. The schedule keeps the probe head (epoch 0) unless the
val split says an epoch is better, and lets a fine-tune run on while it improves."""


def backbone_specs(weights: Path) -> dict[str, str]:
    """{backbone name: load_backbone spec} of the demo's comparison."""
    return {"pretrained": f"export:{weights}", "random": "random"}


def protocol(cfg: DemoConfig) -> dict:
    """The downstream protocol as run (the same for every backbone)."""
    return {"fractions": list(cfg.fractions), "max_epochs": list(cfg.finetune_epochs), "patience": cfg.patience,
            "min_delta": cfg.min_delta, "clips_per_video": cfg.test_clips, "finetune": FINETUNE, "early_stopping": "best val-split "
            "headline metric (view accuracy, EF MAE) over epochs 0 (the probe head) .. max; ties keep the earlier"}


def _probes(cfg: DemoConfig, recipe, specs: dict[str, str]) -> tuple[dict, dict]:
    """Stage 6: each backbone of `specs`'s features of train / val / test (computed once), a linear
    probe per task and label fraction (weight decay picked on val, the same rule for both)
    -> ({fraction: {backbone: {task: test results}}}, {(backbone, task, fraction): (task, head)})."""
    import dataclasses

    from .downstream.backbone import load_backbone, pick_device
    from .downstream.features import extract
    from .downstream.probe import fit_video_probe
    from .downstream.tasks import make_task

    dc = recipe.downstream
    kw = dict(features=dc.features, grid=False, device=pick_device(dc.device), batch=dc.feature_batch)
    results = {f"{f:g}": {b: {} for b in specs} for f in cfg.fractions}
    heads = {}
    for name, spec in specs.items():
        model, _ = load_backbone(spec, recipe, seed=dc.seed)
        train, val, test = (extract(model, recipe.data, split, clips, **kw) for split, clips in (
            (dc.train_split, dc.train_clips), (dc.val_split, dc.test_clips), (dc.test_split, dc.test_clips)))
        for task_name in TASKS:
            for frac in cfg.fractions:
                tcfg = dataclasses.replace(dc, task=task_name, label_key="", classes=[], label_fraction=frac)
                task = make_task(tcfg, train.metas)
                head, fit = fit_video_probe(task, train, val, tcfg)
                results[f"{frac:g}"][name][task_name] = dict(_scored(task, head, test, dc.bootstrap), fit=fit)
                heads[(name, task_name, frac)] = (task, head)
        print(f"[demo] probes [{name}]: " + ", ".join(
            f"{t} {HEADLINE[t]} {results[f'{f:g}'][name][t][HEADLINE[t]]['value']:.3f} ({f:.0%})"
            for f in cfg.fractions for t in TASKS), flush=True)
    return results, heads


def _scored(task, head, test, bootstrap: int) -> dict:
    """Test metrics (patient-bootstrap CIs) + the per-video predictions a paired bootstrap needs."""
    from .downstream import evaluation

    res = evaluation.score_video_task(task, head, test, bootstrap=bootstrap)
    keys, y, scores, patients = evaluation.video_predictions(task, head, test)
    pred = scores.argmax(1) if task.kind == "classification" else scores[:, 0]
    res["per_video"] = {"key": keys, "patient": patients, "y": y.tolist(), "pred": pred.tolist()}
    return res


def _finetune_all(cfg: DemoConfig, recipe, specs: dict[str, str], out: Path, heads: dict,
                  fractions: tuple[float, ...] | None = None) -> tuple[dict, dict]:
    """Stage 7: for each label fraction and task, fine-tune each backbone of `specs` end to
    end, each starting from its own linear-probe head (LP-FT; same seed, patients and epoch
    budget for all), and score the test split
    -> ({fraction: comparison (see `compare`; {} without both demo backbones)},
        {fraction: {backbone: {task: full results}}})."""
    res: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for frac, epochs in zip(cfg.fractions, cfg.finetune_epochs):
        if epochs == 0 or (fractions is not None and frac not in fractions):
            continue
        per: dict[str, dict] = {b: {} for b in specs}
        for task in TASKS:
            for name, spec in specs.items():
                print(f"[demo] 7/7 fine-tune {task} on {frac:.0%} of the training patients, {name} init, "
                      f"<= {epochs} epoch(s)", flush=True)
                per[name][task] = _finetune_one(recipe, spec, heads[(name, task, frac)], frac, (epochs, cfg.patience,
                                                cfg.min_delta), out / "downstream" / f"ft_{task}_{frac:g}_{name}")
        both = all(b in per for b in BACKBONES)
        res[f"{frac:g}"], raw[f"{frac:g}"] = dict(compare(per) if both else {}, epochs=epochs), per
    return res, raw


def _finetune_one(recipe, spec: str, task_head: tuple, fraction: float, stop: tuple[int, int, float],
                  run_dir: Path) -> dict:
    """One early-stopped fine-tune (the finetune engine, one resumable run per epoch in
    `run_dir/epoch<k>`) from a probe head: the epoch (0 = the probe head as it is) with the
    best val-split score is kept and scored on the test split. stop: (most epochs,
    patience, min_delta) as in `DemoConfig`."""
    import copy
    import dataclasses

    from .downstream.backbone import load_backbone
    from .downstream.finetune import finetune

    task, head = task_head
    dc = dataclasses.replace(recipe.downstream, task=task.name, label_key="", classes=list(task.classes),
                             label_fraction=fraction, epochs=1, **FINETUNE)
    r = dataclasses.replace(recipe, downstream=dc)
    model, _ = load_backbone(spec, r, seed=dc.seed)
    head = copy.deepcopy(head)
    best = (_val_score(task, model, head, r), 0, copy.deepcopy((model.state_dict(), head.state_dict())))
    trail, steps, loss = [best[0]], 0, None
    epochs, patience, min_delta = stop
    for e in range(1, epochs + 1):
        net, fit = finetune(task, model, r, run_dir=run_dir / f"epoch{e}", resume="auto", head=head,
                            log=lambda m: None)
        model, head, steps, loss = net.backbone, net.head, steps + fit["steps"], fit["final_loss"]
        trail.append(_val_score(task, model, head, r))
        if trail[-1] > best[0] + min_delta * abs(best[0]):
            best = (trail[-1], e, copy.deepcopy((model.state_dict(), head.state_dict())))
        elif e - best[1] >= patience:
            break
    model.load_state_dict(best[2][0])
    head.load_state_dict(best[2][1])
    print(f"[demo] fine-tune {task.name}: {len(trail) - 1} epoch(s), {steps} steps, best on val at epoch {best[1]}"
          f" (val {_val_name(task)} by epoch: {', '.join(f'{abs(v):.3f}' for v in trail)})", flush=True)
    res = _scored(task, head.eval(), _features(model, r, dc.test_split), dc.bootstrap)
    res["fit"] = {"train_patients": fit["train_patients"], "steps": steps, "final_loss": loss,
                  "best_epoch": best[1], "epochs_run": len(trail) - 1, "val_by_epoch": [abs(v) for v in trail]}
    return res


def _features(model, recipe, split: str):
    from .downstream.backbone import pick_device
    from .downstream.features import extract

    dc = recipe.downstream
    return extract(model, recipe.data, split, dc.test_clips, features=dc.features, grid=False,
                   device=pick_device(dc.device), batch=dc.feature_batch)


def _val_name(task) -> str:
    return "mae" if task.kind == "regression" else "accuracy"


def _val_score(task, model, head, recipe) -> float:
    """Higher is better: val accuracy, or minus val MAE."""
    from .downstream import evaluation

    feats = _features(model.eval(), recipe, recipe.downstream.val_split)
    res = evaluation.score_video_task(task, head.eval(), feats, bootstrap=0)
    v = res[_val_name(task)]["value"]
    return -v if task.kind == "regression" else v


# ---------------------------------------------------------------- comparisons


HEADLINE = {"view": "accuracy", "ef": "mae"}
LOWER_IS_BETTER = {"mae", "error"}


def verdict(diff: dict, metric: str) -> str:
    """'better beyond noise' / 'worse beyond noise' / 'within noise' for a difference
    (pretrained - random) whose 95% CI is diff['ci_low'..'ci_high']."""
    lo, hi = diff["ci_low"], diff["ci_high"]
    good, bad = (hi < 0, lo > 0) if metric in LOWER_IS_BETTER else (lo > 0, hi < 0)
    return "better beyond noise" if good else ("worse beyond noise" if bad else "within noise")


def compare(per: dict[str, dict[str, dict]], a: str = "pretrained", b: str = "random") -> dict:
    """per: {backbone: {task: test metrics + 'per_video'}} -> {task: {'metric', a, b (value
    [CI]), 'difference' (a - b in the metric's units, paired patient-bootstrap CI over the
    same test videos), 'verdict'}}."""
    from .downstream.probe import paired_gap

    out = {}
    for task in per[a]:
        m = HEADLINE[task]
        g = paired_gap(per, task, a, b)  # positive = a better
        if m in LOWER_IS_BETTER:  # a - b = -(b - a); + 0.0 turns -0.0 into 0.0
            g = {"value": 0.0 - g["value"], "ci_low": 0.0 - g["ci_high"], "ci_high": 0.0 - g["ci_low"]}
        row = {"metric": m, a: per[a][task][m], b: per[b][task][m], "difference": g, "verdict": verdict(g, m),
               "videos": per[a][task].get("videos"), "patients": per[a][task].get("patients")}
        if "r2" in per[a][task]:
            row["r2"] = {a: per[a][task]["r2"]["value"], b: per[b][task]["r2"]["value"]}
        if "fit" in per[a][task]:
            row["fit"] = {a: per[a][task]["fit"], b: per[b][task]["fit"]}
        out[task] = row
    return out


def bar(finetune: dict, floor: dict | None = None, phase: dict | None = None) -> dict:
    """The bar, in two parts. Phase (when `phase` is given): the pretrained phase embeddings
    retrieve the cycle phase better than random ones beyond the CI of the difference
    ("phase_met"). Downstream ("met"): pretrained beats random beyond the CI of the
    difference on view accuracy or EF MAE under fine-tuning with the smallest label
    fraction below 1 (10%). floor: {task: chance value} (the supervised reference's chance
    row); a win where the pretrained model is itself no better than chance does not count
    (and is named). The line names exactly what was met."""
    down = _downstream_bar(finetune, floor)
    if phase is None:
        return down
    d = phase["difference_vs_random"]
    ok = d["verdict"] == "better beyond noise"
    head = (f"phase retrieval {'MET' if ok else 'NOT MET'} (pretrained - random phase error {_diff(d)}, "
            f"{d['verdict']}); downstream ")
    return dict(down, phase_met=ok, line=head + down["line"])


def _downstream_bar(finetune: dict, floor: dict | None) -> dict:
    low = sorted((float(f), f) for f in finetune if float(f) < 1)
    if not low:
        return {"met": None, "line": "no fine-tune below 100% of the labels was run"}
    key = low[0][1]
    wins, hollow = [], []
    for t in TASKS:
        row = finetune[key].get(t)
        if row is None or row["verdict"] != "better beyond noise":
            continue
        v, f = row["pretrained"]["value"], (floor or {}).get(t)
        beats_chance = f is None or (v < f if row["metric"] in LOWER_IS_BETTER else v > f)
        (wins if beats_chance else hollow).append(t)
    line = (f"MET on {', '.join(wins)}" if wins else "NOT MET: on neither view accuracy nor EF MAE") + \
        f" (fine-tune with {float(key):.0%} of the labels, pretrained beyond the CI of the difference)"
    if hollow:
        line += f"; {', '.join(hollow)}: pretrained beats random beyond the CI but not chance, so it does not count"
    return {"met": bool(wins), "fraction": float(key), "tasks": wins, "below_chance": hollow, "line": line}


def chance_floor(c: dict | None) -> dict | None:
    """{task: chance value} from the ceiling's chance row (None when absent)."""
    if not c or "chance" not in c:
        return None
    return {"view": c["chance"]["view_accuracy"]["value"], "ef": c["chance"]["ef_mae"]["value"]}


def ceiling(path: Path = CEILING) -> dict | None:
    """The supervised reference's rows (CNN from scratch with all labels, pixels, chance)
    on the demo corpus, or None when the results file is absent."""
    try:
        ref = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return {"source": "benchmarks/results/supervised_ref.json" if Path(path) == CEILING else str(path),
            "test_videos": ref.get("test_videos"), "test_patients": ref.get("test_patients"),
            **{k: ref["rows"][k] for k in ("cnn", "pixels", "chance") if k in ref.get("rows", {})}}


# ---------------------------------------------------------------- phase


def _phase(cfg: DemoConfig, recipe, specs: dict[str, str], keep_queries: bool = False) -> dict:
    """Stage 5: cycle-phase retrieval on the test split's clips: the per-slice phase
    embeddings of each backbone of `specs`, and the pixels; differences vs "random" and
    "pixels" for every other backbone. keep_queries: keep each retrieval's per-query errors
    (for paired differences computed later, e.g. across the ablation's arms)."""
    from .downstream import phase
    from .downstream.backbone import load_backbone, pick_device

    dc = recipe.downstream
    models = {name: load_backbone(spec, recipe, seed=dc.seed)[0] for name, spec in specs.items()}
    print(f"[demo] 5/7 cycle-phase retrieval on the test clips: {' vs '.join(models)} vs pixels", flush=True)
    slices, skipped = phase.split_slices(models, recipe.data, dc.test_split, cfg.phase_clips,
                                         tubelet=next(iter(models.values())).cfg.tubelet, device=pick_device(dc.device),
                                         batch=dc.feature_batch)
    res = {k: phase.phase_retrieval(s, bootstrap=dc.bootstrap, seed=dc.seed) for k, s in slices.items()}
    out = {k: r if keep_queries else {m: v for m, v in r.items() if m != "per_query"} for k, r in res.items()}
    for name in (n for n in models if n != "random"):
        for other in (o for o in ("random", "pixels") if o in res):
            d = phase.paired_difference(res[name], res[other], bootstrap=dc.bootstrap, seed=dc.seed)
            key = f"difference_vs_{other}" if name == "pretrained" else f"{name}_difference_vs_{other}"
            out[key] = dict(d, verdict=verdict(d, "error"))
    out["videos_without_cycle"] = skipped
    out["hit_threshold"] = phase.HIT
    return out


# ---------------------------------------------------------------- printing


def _ci(m: dict, fmt: str = ".3f") -> str:
    return f"{m['value']:{fmt}} [{m['ci_low']:{fmt}}, {m['ci_high']:{fmt}}]"


def _diff(d: dict) -> str:
    return f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def comparison_line(task: str, row: dict) -> str:
    """'view accuracy 0.650 vs 0.700, difference -0.050 [-0.120, +0.020] (within noise)'."""
    return (f"{task} {row['metric']} {row['pretrained']['value']:.3f} vs {row['random']['value']:.3f}, "
            f"difference {_diff(row['difference'])} ({row['verdict']})")


def summary_lines(r: dict) -> list[str]:
    """The printed summary: paths, then every comparison stated plainly with its CI."""
    p, s, o = r["pretrain"], r["seconds"], r["objective"]
    lines = ["", f"EchoFM demo done in {s['total_s']:.0f} s ({s['total_cpu_s']:.0f} CPU s)",
             f"  corpus        {r['corpus']}", f"  shards        {r['shards']}",
             f"  pretraining   {p['steps']} steps, loss {p['first_loss']:.4f} -> {p['last_loss']:.4f}"
             if p.get("first_loss") is not None else f"  pretraining   {p['steps']} steps (already complete)",
             f"  objective     {o['variant']}: rec + {o['triplet_weight']:g} x triplet + {o['cycle_weight']:g} x cycle KL,"
             f" mask {o['mask_ratio']:g}",
             f"  metrics       {r['metrics']}  (tensorboard --logdir {r['tensorboard']})",
             f"  figures       {r['figures']}", f"  checkpoint    {r['checkpoint']}",
             f"  weights       {r['weights']}  (EchoFM.from_pretrained)"]
    lines += _health_lines(r.get("phase_health"))
    lines.append("  pretrained vs random init on held-out test patients; difference = pretrained - random "
                 "[95% CI, paired bootstrap over patients]:")
    lines += _phase_lines(r.get("phase"))
    for frac, cmp in r["finetune"].items():
        any_task = next(iter(t for t in TASKS if t in cmp))
        fit = cmp[any_task].get("fit", {}).get("pretrained", {})
        lines.append(f"  fine-tune, {float(frac):.0%} of the labels ({fit.get('train_patients', '?')} training patients, "
                     f"<= {cmp['epochs']} epochs, best on val):")
        lines += [f"    {comparison_line(t, cmp[t])}{_epochs(cmp[t])}" for t in TASKS if t in cmp]
    for frac, cmp in (r.get("probe") or {}).items():
        lines.append(f"  linear probe (secondary), {float(frac):.0%} of the labels:")
        lines += [f"    {comparison_line(t, cmp[t])}" for t in TASKS if t in cmp]
    lines += _ceiling_lines(r.get("ceiling"))
    lines.append(f"  BAR: {r['bar']['line']}")
    lines.append("  seconds       " + ", ".join(f"{k[:-2]} {v}" for k, v in s.items()))
    return lines


def _epochs(row: dict) -> str:
    f = row.get("fit") or {}
    if "best_epoch" not in f.get("pretrained", {}):
        return ""
    return f"; best epoch {f['pretrained']['best_epoch']} vs {f['random']['best_epoch']}"


def _health_lines(h: dict | None) -> list[str]:
    """The collapse monitor at the first and last logged pretraining steps."""
    if not h:
        return []
    def one(r):
        return (f"step {r['step']}: slice share {r['phase_slice_share']:.2f}, r(S, P) "
                f"{r.get('phase_sp_corr', float('nan')):.2f}, S spread {r['phase_s_spread']:.2f}")
    return [f"  phase branch  {one(h['first'])} -> {one(h['last'])} (collapsed: slice share > 0.9)"]


def _phase_lines(ph: dict | None) -> list[str]:
    if not ph:
        return []
    rows = ", ".join(f"{k} {_ci(ph[k]['error'])}" for k in ("pretrained", "random", "pixels") if k in ph)
    chance = ph["pretrained"]["chance_error"]["value"]
    d = ph["difference_vs_random"]
    return [f"  PHASE: pretrained - random cycle-phase error {_diff(d)} ({d['verdict']})",
            f"    top-1 phase error in cycles on the test clips (lower is better; chance {chance:.3f}): {rows};"
            f" pretrained - pixels {_diff(ph['difference_vs_pixels'])} ({ph['difference_vs_pixels']['verdict']})"]


def _ceiling_lines(c: dict | None) -> list[str]:
    if not c:
        return ["  supervised ceiling: benchmarks/results/supervised_ref.json not found"]
    out = [f"  supervised ceiling ({c['source']}, {c['test_videos']} test videos / {c['test_patients']} patients):"]
    for k, name in (("cnn", "3D CNN from scratch, all labels"), ("chance", "chance")):
        if k in c:
            out.append(f"    {name}: view accuracy {_ci(c[k]['view_accuracy'])}, ef mae {_ci(c[k]['ef_mae'])}")
    return out
