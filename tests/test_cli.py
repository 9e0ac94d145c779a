"""The `echofm` command: every subcommand is listed, and `bench` runs the scripts."""
import subprocess
import sys

import pytest

from echofm.engine.cli import SUBCOMMANDS, build_parser, main

EXPECTED = {"synth", "ingest", "shards", "pretrain", "export", "convert", "finetune", "evaluate", "bench", "demo",
            "config", "embed", "neighbours"}


def test_help_lists_every_subcommand(capsys):
    for name in sorted(EXPECTED):  # each parses and has its own help
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([name, "--help"])
        assert e.value.code == 0 and f"usage: echofm {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["pretrian", "r.yaml"])
    assert e.value.code == 2 and "invalid choice: 'pretrian'" in capsys.readouterr().err
    assert len(SUBCOMMANDS) == len(EXPECTED)
    args = build_parser().parse_args(["finetune", "r.yaml", "--set", "a=1", "--resume", "auto"])
    assert (args.recipe, args.overrides, args.resume) == ("r.yaml", ["a=1"], "auto")
    res = subprocess.run([sys.executable, "-m", "echofm.engine.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and all(name in res.stdout for name in EXPECTED)


def test_bench_runs_the_script(capsys, monkeypatch):
    # kernels.py on a CPU-only machine states that it needs a GPU and exits 0.
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "kernels"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_user_error_from_another_module_is_one_line_under_python_m(tmp_path):
    # Regression: with UserError defined in cli.py, `python -m echofm.engine.cli` (how
    # torchrun launches us) had two UserError classes and printed a traceback instead.
    res = subprocess.run([sys.executable, "-m", "echofm.engine.cli", "export", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("echofm: error: ") and "Traceback" not in res.stderr
