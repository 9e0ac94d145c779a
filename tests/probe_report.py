"""Reports over `compare_backbones` results that only the tests print and check: the table
of headline metrics and the one-line verdict of one backbone against another."""
from __future__ import annotations

from echofm.engine.downstream.probe import HEADLINE, paired_gap


def format_comparison(results: dict[str, dict[str, dict]]) -> str:
    """A small table: one row per backbone, headline test metric (95% CI) per task."""
    names = list(results)
    tasks = list(results[names[0]])
    head = f"{'backbone':<12}" + "".join(f"{t + ' ' + HEADLINE[t]:>28}" for t in tasks)
    rows = [head]
    for n in names:
        cells = []
        for t in tasks:
            m = results[n][t][HEADLINE[t]]
            cells.append(f"{m['value']:>10.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]".rjust(28))
        rows.append(f"{n:<12}" + "".join(cells))
    return "\n".join(rows)


def beats(results: dict[str, dict[str, dict]], a: str = "pretrained", b: str = "random") -> dict[str, bool]:
    """Per task: does backbone `a` beat `b` on the headline test metric (accuracy up, MAE down)?"""
    out = {}
    for task in results[a]:
        va, vb = results[a][task][HEADLINE[task]]["value"], results[b][task][HEADLINE[task]]["value"]
        out[task] = va < vb if HEADLINE[task] == "mae" else va > vb
    return out


def bar_verdict(results: dict[str, dict[str, dict]], a: str = "pretrained", b: str = "random") -> str:
    """One line per task: both numbers, the paired gap with its 95% CI, and whether `a` is
    better beyond noise (the CI of the gap excludes 0)."""
    parts = []
    for task, ok in beats(results, a, b).items():
        m = HEADLINE[task]
        g = paired_gap(results, task, a, b)
        sure = g["ci_low"] > 0
        word = "better beyond noise" if sure else ("better, within noise" if ok else "NOT better")
        parts.append(f"{task} {m} {results[a][task][m]['value']:.3f} vs {results[b][task][m]['value']:.3f}, "
                     f"gap {g['value']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}] ({word})")
    return f"{a} vs {b}: " + "; ".join(parts)
