"""The objective ablation, as the paper would table it, at the demo's scale.

    python benchmarks/ablation.py [--seeds 0,1,2] [--steps 600] [--work DIR]
                                  [--out benchmarks/results/ablation.json] [--plot PNG]

Three pretraining objectives of echofm_tiny on the demo's corpus and shards (engine/demo.py
builds and caches them; the same corpus for every run), each with several pretraining seeds:

- `reconstruction`: masked reconstruction only (VideoMAE-style: triplet and cycle weights 0);
- `official`: the paper's objective as the official code writes it (raw-cosine S);
- `centred`: the same terms with the centred S (the project's default, docs/fidelity.md).

Each run is evaluated by the demo's own stages (`_phase`, `_probes`, `_finetune_all`, the
demo's protocol and seeds), plus one random-init backbone: cycle-phase retrieval error, view
accuracy and EF MAE under linear probes and LP-FT fine-tunes at 10% and 100% of the labels.
Every number has a patient-bootstrap 95% CI: per run, and for each objective's seed mean
(the metric averaged over its seeds on each resample of the test patients); each objective
is also compared with random init and with reconstruction-only (paired: the same test
videos). The collapse monitor's last reading (engine/phase_health.py) is kept per run.

Prints the table, writes ablation.json to a run folder (or --out) and a PNG beside it (or
--plot), and names the comparisons that the CPU scale leaves open: the question a
GPU-scale run (benchmarks/demo_scale.py, 10-50x the steps) should settle.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echofm.engine import bench

ARMS = {
    "reconstruction": ("loss.variant=centred", "loss.triplet_weight=0", "loss.cycle_weight=0"),
    "official": ("loss.variant=official",),
    "centred": ("loss.variant=centred",),
}
"""Objective name -> recipe overrides on echofm_tiny."""
BOOTSTRAP = 1000
"""Patient-bootstrap resamples (the demo's)."""
FINETUNE_EPOCHS = (12, 2)
"""Most fine-tune epochs at 10% / 100%: the demo's early-stopped protocol, at 100% two
epochs (the demo caps it at one for its time budget)."""


def cached(work: Path, name: str, make) -> dict:
    """`make()` once per run name: its result is kept in `work/eval/<name>.json`, so runs
    spread over several processes (e.g. one per seed) are put together by a last call that
    finds them all."""
    import json

    path = work / "eval" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    res = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    tmp.replace(path)
    return json.loads(path.read_text())


def run_arm(cfg, work: Path, shards: Path, arm: str, seed: int) -> dict:
    """Pretrain + export one (objective, seed) run (resumable) and evaluate it with the
    demo's stages -> {"phase", "probe", "finetune", "health", "pretrain"} (cached)."""
    return cached(work, f"{arm}_s{seed}", lambda: _run_arm(cfg, work, shards, arm, seed))


def _run_arm(cfg, work: Path, shards: Path, arm: str, seed: int) -> dict:
    from echofm.engine import demo
    from echofm.engine.export import export
    from echofm.engine.trainer import pretrain

    name = f"{arm}_s{seed}"
    recipe = demo._recipe(cfg, work, shards, (*ARMS[arm], f"train.seed={seed}", f"train.out_dir={work / 'runs' / name}"))
    print(f"[ablation] {name}: pretrain {cfg.steps} steps ({recipe.loss.variant}, triplet "
          f"{recipe.loss.triplet_weight:g}, cycle {recipe.loss.cycle_weight:g})", flush=True)
    summary = pretrain(recipe, resume="auto")
    weights = work / "export" / name
    export(summary["run_dir"], weights)
    return evaluate(cfg, work, recipe, {arm: f"export:{weights}"}, name) | {
        "health": demo.phase_health_trace(Path(summary["run_dir"]) / "metrics.jsonl"),
        "pretrain": {k: summary.get(k) for k in ("steps", "first_loss", "last_loss", "wall_s")}}


def evaluate(cfg, work: Path, recipe, specs: dict[str, str], name: str) -> dict:
    """The demo's phase retrieval, probes and fine-tunes of one backbone."""
    from echofm.engine import demo

    phase = demo._phase(cfg, recipe, specs, keep_queries=True)
    probe, heads = demo._probes(cfg, recipe, specs)
    _, raw = demo._finetune_all(cfg, recipe, specs, work / "ft" / name, heads)
    (arm,) = specs
    return {"phase": phase[arm], "pixels": phase["pixels"],
            "probe": {f: per[arm] for f, per in probe.items()}, "finetune": {f: per[arm] for f, per in raw.items()}}


# ---------------------------------------------------------------- rows and CIs


def rows_of(runs: dict) -> list[tuple[str, str, str, str]]:
    """(row label, kind, fraction, task) of the table: phase, then probe / fine-tune x
    fraction x task."""
    out = [("phase error", "phase", "", "")]
    any_run = next(iter(runs.values()))
    for kind in ("probe", "finetune"):
        for frac in any_run[kind]:
            for task in ("view", "ef"):
                out.append((f"{kind} {float(frac):.0%} {task}", kind, frac, task))
    return out


def unit_values(run: dict, kind: str, frac: str, task: str) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None]:
    """(per-unit scores or predictions, patients, metric, labels): phase -> per-query errors;
    downstream -> per-video predictions and labels."""
    if kind == "phase":
        q = run["phase"]["per_query"]
        return np.asarray(q["error"]), np.asarray(q["patient"]), "error", None
    r = run[kind][frac][task]
    pv = r["per_video"]
    return np.asarray(pv["pred"]), np.asarray(pv["patient"]), "mae" if task == "ef" else "accuracy", np.asarray(pv["y"])


def seed_metric(preds: list[np.ndarray], metric: str, y: np.ndarray | None):
    """i -> the metric averaged over the seeds' predictions on rows i."""
    from echofm.engine.downstream import metrics as task_metrics

    if metric == "error":
        return lambda i: float(np.mean([p[i].mean() for p in preds]))
    fn = task_metrics.mae if metric == "mae" else task_metrics.accuracy
    return lambda i: float(np.mean([fn(y[i], p[i]) for p in preds]))


def cell(runs: list[dict], kind: str, frac: str, task: str, boot: int) -> dict:
    """Seed mean with its patient-bootstrap CI, and each seed's value."""
    from echofm.engine.downstream import metrics as task_metrics

    vals = [unit_values(r, kind, frac, task) for r in runs]
    patients, metric, y = vals[0][1], vals[0][2], vals[0][3]
    f = seed_metric([v[0] for v in vals], metric, y)
    lo, hi = task_metrics.bootstrap_ci(f, patients, samples=boot)
    per_seed = [seed_metric([v[0]], metric, y)(np.arange(len(patients))) for v in vals]
    return {"metric": metric, "value": f(np.arange(len(patients))), "ci_low": lo, "ci_high": hi, "per_seed": per_seed}


def paired(a: list[dict], b: list[dict], kind: str, frac: str, task: str, boot: int) -> dict:
    """Seed-mean metric of `a` minus `b` on the same units, paired patient-bootstrap CI."""
    from echofm.engine import demo
    from echofm.engine.downstream import metrics as task_metrics

    va, vb = ([unit_values(r, kind, frac, task) for r in x] for x in (a, b))
    patients, metric, y = va[0][1], va[0][2], va[0][3]
    fa, fb = seed_metric([v[0] for v in va], metric, y), seed_metric([v[0] for v in vb], metric, y)

    def gap(i):
        return fa(i) - fb(i)

    lo, hi = task_metrics.bootstrap_ci(gap, patients, samples=boot)
    d = {"value": gap(np.arange(len(patients))), "ci_low": lo, "ci_high": hi}
    return dict(d, verdict=demo.verdict(d, metric))


def table(runs: dict[str, list[dict]], random: dict, boot: int) -> list[dict]:
    rows = []
    for label, kind, frac, task in rows_of({k: v[0] for k, v in runs.items()}):
        row = {"row": label, "kind": kind, "fraction": frac, "task": task,
               "random": cell([random], kind, frac, task, boot)}
        for arm, rs in runs.items():
            row[arm] = cell(rs, kind, frac, task, boot)
            row[f"{arm}_vs_random"] = paired(rs, [random], kind, frac, task, boot)
            if arm != "reconstruction" and "reconstruction" in runs:
                row[f"{arm}_vs_reconstruction"] = paired(rs, runs["reconstruction"], kind, frac, task, boot)
        if "centred" in runs and "official" in runs:
            row["centred_vs_official"] = paired(runs["centred"], runs["official"], kind, frac, task, boot)
        rows.append(row)
    return rows


def open_questions(rows: list[dict]) -> list[str]:
    """Rows where the centred objective's difference from reconstruction-only (what the
    periodic terms add) is within noise at this scale."""
    out = []
    for r in rows:
        d = r.get("centred_vs_reconstruction")
        if d is not None and d["verdict"] == "within noise":
            out.append(f"{r['row']}: centred - reconstruction {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    return out


def print_table(rows: list[dict], arms: list[str]) -> None:
    def ci(c):
        return f"{c['value']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"

    print(f"\n{'row':<20}" + "".join(f"{a:>28}" for a in ["random", *arms]))
    for r in rows:
        print(f"{r['row']:<20}" + "".join(f"{ci(r[a]):>28}" for a in ["random", *arms]))
    print("\nvs random (paired, seed mean):")
    for r in rows:
        print(f"  {r['row']:<20}" + "; ".join(
            f"{a} {r[f'{a}_vs_random']['value']:+.3f} ({r[f'{a}_vs_random']['verdict']})" for a in arms))


def plot(rows: list[dict], arms: list[str], path: Path) -> Path:
    """One panel per metric family: seed means with 95% CIs, random init as a grey bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("phase error (lower better)", [r for r in rows if r["kind"] == "phase"]),
              ("view accuracy", [r for r in rows if r["task"] == "view"]),
              ("EF MAE (lower better)", [r for r in rows if r["task"] == "ef"])]
    names = ["random", *arms]
    colors = {"random": "0.6", "reconstruction": "tab:blue", "official": "tab:orange", "centred": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 4, 4]})
    for ax, (title, rs) in zip(axes, groups):
        w = 0.8 / len(names)
        for k, n in enumerate(names):
            x = np.arange(len(rs)) + (k - (len(names) - 1) / 2) * w
            v = np.array([r[n]["value"] for r in rs])
            err = np.array([[r[n]["value"] - r[n]["ci_low"], r[n]["ci_high"] - r[n]["value"]] for r in rs]).T
            ax.bar(x, v, w, yerr=err, color=colors.get(n), label=n, capsize=2)
        ax.set_xticks(np.arange(len(rs)), [r["row"].replace(" view", "").replace(" ef", "") for r in rs],
                      fontsize=7, rotation=20)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("objective ablation (echofm_tiny, demo corpus): seed means, patient-bootstrap 95% CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="pretraining seeds (comma separated)")
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps per run (the demo runs 600)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"objectives (of {', '.join(ARMS)})")
    ap.add_argument("--videos", type=int, default=None, help="corpus size (default: the demo's; smaller: a smoke run)")
    ap.add_argument("--work", default=None, help="working folder (default: the bench cache)")
    ap.add_argument("--out", default=None, help="results file (default: a new run folder)")
    ap.add_argument("--plot", default=None, help="PNG (default: beside the results file, ablation.png)")
    args = ap.parse_args(argv)
    from echofm.engine import demo

    seeds, arms = [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    work = Path(args.work) if args.work else bench.cache_dir("ablation")
    t0, c0 = time.time(), time.process_time()
    cfg = demo.DemoConfig(out=str(work), steps=args.steps, finetune_epochs=FINETUNE_EPOCHS,
                       **({"videos": args.videos} if args.videos else {}))
    _, shards = demo._data(cfg, work, demo._Clock())
    recipe = demo._recipe(cfg, work, shards)
    random = cached(work, "random", lambda: evaluate(cfg, work, recipe, {"random": "random"}, "random"))
    path = bench.results_path("ablation", args.out, "ablation.json")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in seeds:  # seed-major: every finished seed is written (all arms), in case the budget runs out
        for a in arms:
            runs[a].append(run_arm(cfg, work, shards, a, seed))
        write(path, args, cfg, runs, random, seeds[:len(runs[arms[0]])], t0, c0, work)
    return 0


def monitor(metrics: Path) -> dict:
    """The collapse monitor over the second half of a run's logged steps: the median of each
    `phase_*` figure (one batch per logged step is noisy) and the share of steps that read
    as collapsed."""
    import json

    from echofm.engine import phase_health

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"phase_' in ln]
    rows = rows[len(rows) // 2:]
    if not rows:
        return {}
    out = {k: float(np.median([r[k] for r in rows])) for k in rows[-1] if k.startswith("phase_")}
    out["collapsed_steps"] = float(np.mean([phase_health.collapsed(r) for r in rows]))
    out["steps"] = [rows[0]["step"], rows[-1]["step"]]
    return out


def write(path: Path, args, cfg, runs: dict, random: dict, seeds: list[int], t0: float, c0: float,
          work: Path) -> None:
    """The table, the open questions, ablation.json and its PNG from the runs so far."""
    from echofm.engine import demo

    arms = list(runs)
    rows = table(runs, random, BOOTSTRAP)
    print_table(rows, arms)
    questions = open_questions(rows)
    print("\nleft open at this scale (a GPU-scale run, benchmarks/demo_scale.py, should settle):\n  "
          + "\n  ".join(questions or ["none"]))
    out = {"arms": {a: list(ARMS[a]) for a in arms}, "seeds": seeds, "steps": args.steps,
           "demo_steps": demo.DemoConfig().steps, "protocol": demo.protocol(cfg), "rows": rows,
           "health": {a: [monitor(work / "runs" / f"{a}_s{s}" / "echofm_tiny" / "metrics.jsonl") for s in seeds]
                      for a in runs},
           "pretrain": {a: [r["pretrain"] for r in rs] for a, rs in runs.items()},
           "pixels_phase_error": random["pixels"]["error"], "gpu_question": questions,
           "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    for a, hs in out["health"].items():
        print(f"collapse monitor [{a}] (median over the second half of the logged steps, per seed): slice share "
              + ", ".join(f"{h.get('phase_slice_share', float('nan')):.3f}" for h in hs) + "; r(S, P) "
              + ", ".join(f"{h.get('phase_sp_corr', float('nan')):.2f}" for h in hs))
    bench.write_json(path, out)
    print(f"plot: {plot(rows, arms, Path(args.plot) if args.plot else path.with_suffix('.png'))}")


if __name__ == "__main__":
    sys.exit(main())
