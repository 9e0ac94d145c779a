"""`echofm demo` end to end at toy size (a 30-video corpus, 2 pretraining steps, one
fine-tune epoch): every stage runs and the summary holds each comparison with its CI, the
bar, the phase retrieval and the ceiling. (The numbers of the summary logic are checked in
test_demo_summary.py; the full-size demo's result is in the README.)"""
import json


def test_demo_runs_every_stage_at_toy_size(tmp_path, capsys):
    from echofm.engine.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), videos=30, steps=2, fractions=(0.5,), finetune_epochs=(1,),
                     test_clips=1, seed=3)
    res = run_demo(cfg)
    saved = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert saved["bar"] == res["bar"] and saved["bar"]["fraction"] == 0.5
    for section in (saved["finetune"]["0.5"], saved["probe"]["0.5"]):
        for task in ("view", "ef"):
            d = section[task]["difference"]
            assert d["ci_low"] <= d["value"] <= d["ci_high"]
            assert section[task]["verdict"] in ("better beyond noise", "worse beyond noise", "within noise")
    assert saved["finetune"]["0.5"]["view"]["fit"]["pretrained"]["steps"] == \
        saved["finetune"]["0.5"]["view"]["fit"]["random"]["steps"]  # same budget for both backbones
    for b in ("pretrained", "random"):  # regression: at 10x these lrs the LP-FT loss went from ~1e-5 to 11-28
        assert saved["finetune"]["0.5"]["view"]["fit"][b]["final_loss"] < 2.0
    ph = saved["phase"]
    assert ph["pretrained"]["queries"] == ph["random"]["queries"] == ph["pixels"]["queries"] > 0
    assert 0 <= ph["pixels"]["error"]["value"] <= 0.5
    assert saved["objective"]["variant"] == "centred" and saved["ceiling"]["cnn"]
    out = capsys.readouterr().out
    assert "BAR: phase retrieval" in out and "PHASE: pretrained - random" in out
    assert (tmp_path / "demo" / "downstream" / "demo_finetune.json").is_file()
