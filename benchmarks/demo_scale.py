"""Does more pretraining move the demo's pretrained-vs-random gap? The demo, longer.

    python benchmarks/demo_scale.py --steps 1800 [--work DIR] [--baseline demo_out/demo_summary.json] [--out FILE]

Runs `echofm demo` (engine/demo.py: same corpus, same objective (the tiny recipe's:
`centred`), same fine-tunes at 10% / 100% of the labels, probes and phase retrieval, same
seeds) with
`--steps` pretraining steps in a fresh working folder, so the cosine schedule spans the
longer run. Prints each comparison (difference = pretrained - random, paired
patient-bootstrap 95% CI) next to the baseline summary's (the demo's default steps) and
writes demo_scale.json to a run folder runs/bench/demo_scale-<timestamp>/ (or --out: the
committed numbers are --out benchmarks/results/demo_scale.json). This is the CPU stand-in
for the issue's larger-scale GPU measurement: a few times the demo's steps, not 10-50x.
What such a run should settle is listed by the objective ablation (benchmarks/ablation.py,
`gpu_question` in benchmarks/results/ablation.json): the rows where what the periodic
terms add over reconstruction alone is within noise at the CPU scale.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from echofm.engine import bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1800, help="pretraining steps (the demo runs 600)")
    ap.add_argument("--work", default=None, help="working folder (default: the bench cache)")
    ap.add_argument("--baseline", default=None, help="a demo_summary.json to compare with")
    ap.add_argument("--out", default=None, help="results file (default: a new run folder)")
    args = ap.parse_args(argv)
    from echofm.engine.demo import DemoConfig, comparison_line, run_demo

    work = Path(args.work) if args.work else bench.cache_dir("demo_scale") / f"steps{args.steps}"
    t0 = time.time()
    res = run_demo(DemoConfig(out=str(work), steps=args.steps))
    base = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    print(f"\npretrained vs random, {args.steps} steps" + (f" (baseline: {base['pretrain']['steps']} steps)"
                                                           if base else ""))
    for section in ("finetune", "probe"):  # both {fraction: {task: comparison}}
        for frac, cmp in res[section].items():
            old = (base.get(section) or {}).get(frac, {}) if base else {}
            for task in ("view", "ef"):
                if task in cmp:
                    print(f"  {section} {frac:<4} {comparison_line(task, cmp[task])}"
                          + (f"   | baseline: {comparison_line(task, old[task])}" if task in old else ""))
    keep = ("pretrain", "objective", "finetune", "probe", "phase", "bar", "seconds")
    out = {"steps": args.steps, "work": str(work), **{k: res[k] for k in keep},
           "baseline": {k: base[k] for k in keep if k in base} if base else None,
           "wall_s": round(time.time() - t0, 1), "host": platform.node(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    bench.write_json(bench.results_path("demo_scale", args.out, "demo_scale.json"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
