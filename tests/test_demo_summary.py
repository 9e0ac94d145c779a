"""The demo's summary logic on constructed results whose answers are known: the difference
pretrained - random with its paired patient-bootstrap CI, the verdict, the bar, the printed
lines and the supervised ceiling. (The demo end to end, at small size: test_demo_e2e.py.)"""
import json

import pytest

from echofm.engine.demo import (CEILING, DemoConfig, bar, ceiling, chance_floor, compare, comparison_line,
                                summary_lines, verdict)

PATIENTS = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
Y_VIEW = [0, 1, 2, 3, 0, 1, 2, 3]
Y_EF = [20.0, 30.0, 40.0, 50.0, 60.0, 35.0, 45.0, 55.0]


def _res(metric: str, value: float, y, pred) -> dict:
    keys = [f"v{i}" for i in range(len(y))]
    return {metric: {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}, "videos": len(y), "patients": 4,
            "per_video": {"key": keys, "patient": PATIENTS, "y": list(y), "pred": list(pred)}}


def _per(ef_pre_offset: float, ef_rnd_offset: float, view_rnd_wrong: bool = True) -> dict:
    # view: pretrained always right; random wrong on one of the two videos of every patient
    rnd_view = [(y + 1) % 4 if (i % 2 and view_rnd_wrong) else y for i, y in enumerate(Y_VIEW)]
    return {"pretrained": {"view": _res("accuracy", 1.0, Y_VIEW, Y_VIEW),
                           "ef": _res("mae", abs(ef_pre_offset), Y_EF, [y + ef_pre_offset for y in Y_EF])},
            "random": {"view": _res("accuracy", 0.5 if view_rnd_wrong else 1.0, Y_VIEW, rnd_view),
                       "ef": _res("mae", abs(ef_rnd_offset), Y_EF, [y + ef_rnd_offset for y in Y_EF])}}


def test_difference_is_pretrained_minus_random_with_paired_ci():
    cmp = compare(_per(2.0, -6.0))
    # every resample holds the same 50% gap on view and the same 4-point gap on EF
    assert cmp["view"]["difference"] == pytest.approx({"value": 0.5, "ci_low": 0.5, "ci_high": 0.5})
    assert cmp["ef"]["difference"] == pytest.approx({"value": -4.0, "ci_low": -4.0, "ci_high": -4.0})
    assert cmp["view"]["verdict"] == cmp["ef"]["verdict"] == "better beyond noise"
    assert cmp["ef"]["pretrained"]["value"] == 2.0 and cmp["ef"]["random"]["value"] == 6.0
    line = comparison_line("ef", cmp["ef"])
    assert line == "ef mae 2.000 vs 6.000, difference -4.000 [-4.000, -4.000] (better beyond noise)"


def test_worse_and_within_noise():
    cmp = compare(_per(-6.0, 2.0, view_rnd_wrong=False))
    assert cmp["ef"]["difference"]["value"] == pytest.approx(4.0)
    assert cmp["ef"]["verdict"] == "worse beyond noise"
    assert cmp["view"]["difference"]["value"] == 0.0 and cmp["view"]["verdict"] == "within noise"
    assert verdict({"value": 0.1, "ci_low": -0.05, "ci_high": 0.2}, "accuracy") == "within noise"
    assert verdict({"value": -0.1, "ci_low": -0.2, "ci_high": -0.05}, "accuracy") == "worse beyond noise"
    assert verdict({"value": -1.0, "ci_low": -2.0, "ci_high": -0.5}, "error") == "better beyond noise"


def test_bar_reads_the_fewest_labels():
    win, tie = compare(_per(2.0, -6.0)), compare(_per(2.0, 2.0, view_rnd_wrong=False))
    assert bar({"0.1": dict(win, epochs=6), "1": dict(tie, epochs=1)}) == {
        "met": True, "fraction": 0.1, "tasks": ["view", "ef"], "below_chance": [],
        "line": "MET on view, ef (fine-tune with 10% of the labels, pretrained beyond the CI of the difference)"}
    got = bar({"0.1": dict(tie, epochs=6), "1": dict(win, epochs=1)})  # 100% wins do not count
    assert got["met"] is False and got["line"].startswith("NOT MET")
    assert bar({"1": dict(win, epochs=1)})["met"] is None
    # a win where the pretrained model is itself below chance does not count
    got = bar({"0.1": dict(win, epochs=6)}, {"view": 0.25, "ef": 1.5})  # pretrained EF MAE 2.0 > chance 1.5
    assert got["met"] is True and got["tasks"] == ["view"] and got["below_chance"] == ["ef"]
    assert "ef: pretrained beats random beyond the CI but not chance" in got["line"]
    assert bar({"0.1": dict(win, epochs=6)}, {"view": 1.0, "ef": 1.5})["met"] is False


def test_summary_lines_state_every_comparison(tmp_path):
    ft = {"0.1": dict(compare(_per(2.0, -6.0)), epochs=6)}
    ref = {"test_videos": 60, "test_patients": 23,
           "rows": {k: {"view_accuracy": {"value": v, "ci_low": v, "ci_high": v},
                        "ef_mae": {"value": e, "ci_low": e, "ci_high": e}} for k, v, e in
                    (("cnn", 0.95, 9.96), ("chance", 0.23, 16.4))}}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    err = {"value": 0.1, "ci_low": 0.05, "ci_high": 0.15}
    phase = {k: {"error": err, "chance_error": {"value": 0.25}} for k in ("pretrained", "random", "pixels")}
    phase.update(difference_vs_random={"value": 0.0, "ci_low": -0.01, "ci_high": 0.01, "verdict": "within noise"},
                 difference_vs_pixels={"value": 0.0, "ci_low": -0.01, "ci_high": 0.01, "verdict": "within noise"})
    r = {"pretrain": {"steps": 3, "first_loss": 2.0, "last_loss": 1.0}, "seconds": {"total_s": 10, "total_cpu_s": 15},
         "objective": {"variant": "centred", "triplet_weight": 1.0, "cycle_weight": 1.0, "mask_ratio": 0.75},
         "finetune": ft, "probe": {"1": compare(_per(2.0, 2.0, view_rnd_wrong=False))}, "phase": phase,
         "ceiling": ceiling(tmp_path / "ref.json"), "bar": bar(ft, phase=phase),
         **{k: k for k in ("corpus", "shards", "metrics", "tensorboard", "figures", "checkpoint", "weights")}}
    text = "\n".join(summary_lines(r))
    assert "fine-tune, 10% of the labels" in text and "linear probe (secondary), 100% of the labels:" in text
    assert "view accuracy 1.000 vs 0.500, difference +0.500 [+0.500, +0.500] (better beyond noise)" in text
    assert "ef mae 2.000 vs 2.000, difference +0.000 [+0.000, +0.000] (within noise)" in text  # the probe line
    assert "chance 0.250" in text
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if "difference = pretrained - random" in ln) + 1
    # the verdict starts with phase retrieval, then the downstream comparison
    assert lines[first] == "  PHASE: pretrained - random cycle-phase error +0.000 [-0.010, +0.010] (within noise)"
    assert lines[first + 2].startswith("  fine-tune, 10% of the labels")
    assert "3D CNN from scratch, all labels: view accuracy 0.950 [0.950, 0.950], ef mae 9.960" in text
    assert ("BAR: phase retrieval NOT MET (pretrained - random phase error +0.000 [-0.010, +0.010], within noise); "
            "downstream MET on view, ef") in text
    assert ceiling(tmp_path / "missing.json") is None
    assert chance_floor(r["ceiling"]) == {"view": 0.23, "ef": 16.4}


def test_committed_ceiling_is_the_demo_corpus():
    c = ceiling()
    assert c is not None, f"{CEILING} is missing"
    ref = json.loads(CEILING.read_text())
    from echofm.engine.demo import demo_synth_config

    want = demo_synth_config(DemoConfig())
    assert {k: ref["corpus"][k] for k in ("videos", "seed", "min_size", "max_size", "max_frames", "test_fraction",
                                          "heart_scale", "ef_coupling")} == {
        k: getattr(want, k) for k in ("videos", "seed", "min_size", "max_size", "max_frames", "test_fraction",
                                      "heart_scale", "ef_coupling")}
    assert c["cnn"]["view_accuracy"]["value"] > c["chance"]["view_accuracy"]["value"]


def test_config_pairs_fractions_and_epochs():
    with pytest.raises(ValueError, match="same length"):
        DemoConfig(fractions=(0.1, 1.0), finetune_epochs=(3,)).validate()


def test_bar_names_the_phase_part():
    tie = compare(_per(2.0, 2.0, view_rnd_wrong=False))
    better = {"difference_vs_random": {"value": -0.15, "ci_low": -0.18, "ci_high": -0.12,
                                       "verdict": "better beyond noise"}}
    got = bar({"0.1": dict(tie, epochs=6)}, phase=better)
    assert got["phase_met"] is True and got["met"] is False
    assert got["line"].startswith("phase retrieval MET (pretrained - random phase error -0.150 [-0.180, -0.120], "
                                  "better beyond noise); downstream NOT MET")
