"""The `echofm` command: every subcommand is listed, and `bench` runs the scripts."""
import subprocess
import sys

from echofm.engine.cli import SUBCOMMANDS, build_parser, main

EXPECTED = {"synth", "ingest", "shards", "pretrain", "export", "convert", "finetune", "evaluate", "bench", "demo",
            "config"}


def test_help_lists_every_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == EXPECTED and len(SUBCOMMANDS) == len(EXPECTED)
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
