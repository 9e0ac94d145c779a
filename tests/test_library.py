"""echofm as an installed library: recipes by preset name from any folder, the installed
layout (recipes and benchmarks shipped beside the code), the lazy Python API and the
examples of docs/api.md and docs/embed.md, and the mistakes that must end in one line
(a pretrain recipe given to finetune / evaluate, an attention backend that is not there,
a file that cannot be written, a cohort without the task's labels)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echofm.engine.cli import main
from echofm.engine.config import load_recipe
from echofm.engine.errors import ConfigError
from echofm.engine.resources import BENCHMARKS, RECIPES, recipe_names, resolve_recipe

ROOT = Path(__file__).resolve().parent.parent


def _python_block(page: Path, index: int = 0) -> str:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)[index]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("echofm: error: "), err
    return err[0]


# ---------------------------------------------------------------- recipes by name


def test_recipes_by_preset_name_or_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = RECIPES / "pretrain" / "echofm_tiny.yaml"
    for spec in ("echofm_tiny", "echofm_tiny.yaml", "pretrain/echofm_tiny", "recipes/pretrain/echofm_tiny.yaml"):
        assert resolve_recipe(spec) == tiny, spec
    assert resolve_recipe("ef_regression") == RECIPES / "downstream" / "ef_regression.yaml"
    mine = tmp_path / "echofm_tiny.yaml"  # a file of the user's wins over the preset
    mine.write_text("name: mine\n")
    assert resolve_recipe("echofm_tiny.yaml") == Path("echofm_tiny.yaml")
    assert load_recipe("echofm_vit_base").model.resolved().embed_dim == 768
    with pytest.raises(ConfigError, match=r"^nope: no such recipe file or preset; presets: echofm_tiny, "):
        resolve_recipe("nope")
    with pytest.raises(ConfigError, match=r"^sub/x.yaml: recipe file not found"):
        resolve_recipe("sub/x.yaml")


def test_config_list_and_show_by_name(capsys):
    assert main(["config", "list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    shipped = sorted(p for p in RECIPES.glob("*/*.yaml"))
    assert sorted(Path(r[2]) for r in rows) == shipped and set(recipe_names()) == {r[0] for r in rows}
    assert main(["config", "show", "echofm_vit_base"]) == 0
    assert "embed_dim: 768" in capsys.readouterr().out


# ---------------------------------------------------------------- installed layout


def test_installed_copy_finds_its_recipes_and_benchmarks_from_tmp(tmp_path):
    """setup.py ships recipes/ and benchmarks/ as echofm/recipes and echofm/benchmarks: a
    non-editable install of this tree, run from another folder, finds both."""
    src, target = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)  # a copy: the build writes build/ and *.egg-info beside setup.py
    for folder in ("echofm", "engine", "kernels", "loaders", "recipes", "benchmarks"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pkg = target / "echofm"
    for rel in ("recipes/pretrain/echofm_tiny.yaml", "recipes/downstream/synthetic_view.yaml",
                "benchmarks/train.py", "benchmarks/results/supervised_ref.json", "kernels/attention_table.json"):
        assert (pkg / rel).is_file(), f"the installed package lacks {rel}"
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import echofm, sys; from echofm.engine.resources import RECIPES, BENCHMARKS; "
            "print(echofm.__file__, RECIPES, BENCHMARKS)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == [str(pkg / "__init__.py"), str(pkg / "recipes"), str(pkg / "benchmarks")], out
    cli = [sys.executable, "-m", "echofm.engine.cli"]
    show = subprocess.run([*cli, "config", "show", "echofm_tiny"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert show.returncode == 0 and "name: echofm_tiny" in show.stdout, show.stderr
    bench = subprocess.run([*cli, "bench", "kernels"], cwd=tmp_path, env={**env, "CUDA_VISIBLE_DEVICES": ""},
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "needs a CUDA GPU" in bench.stdout, bench.stderr[-2000:]
    assert BENCHMARKS == ROOT / "benchmarks"  # this process: the checkout


# ---------------------------------------------------------------- Python API


def test_import_echofm_is_cheap_and_names_the_api():
    code = ("import sys, echofm; assert 'torch' not in sys.modules, 'import echofm loaded torch'; "
            "from echofm import EchoFM, load_official, ClipStream, Recipe, load_recipe, load_backbone, export, "
            "embed, EmbedConfig, neighbours, StreamConfig, ModelConfig, recipe_names, UserError; "
            "print(EchoFM.__module__, ClipStream.__module__, Recipe.__module__, load_official.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["echofm.engine.model", "echofm.loaders.stream", "echofm.engine.config",
                                "echofm.engine.adapters"]
    import echofm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        echofm.nope


def _tiny_export(path: Path):
    from echofm.engine.model import EchoFM, ModelConfig

    torch.manual_seed(0)
    model = EchoFM(ModelConfig(preset="echofm_tiny", depth=1, decoder_depth=1))
    model.save_pretrained(path)
    return model.eval()


def test_api_doc_load_and_embed_example_runs(tmp_path):
    """docs/api.md's two lines, executed on an export folder: eval mode, the same numbers as
    the model that was saved."""
    ref = _tiny_export(tmp_path / "export")
    video = torch.randint(0, 256, (2, 16, 112, 112, 3), dtype=torch.uint8)
    ns = {"video": video}
    exec(_python_block(ROOT / "docs" / "api.md", 0).replace("demo_out/export", str(tmp_path / "export")), ns)
    assert not ns["model"].training
    want = ref.encode(video)
    for name, w in zip(("tokens", "cls", "phase"), want):
        assert torch.equal(ns[name], w), name
    assert ns["tokens"].shape == (2, 8 * 7 * 7, 192) and ns["phase"].shape == (2, 8, 192)


def test_api_doc_stream_example_runs(tiny_shards, tmp_path):
    _tiny_export(tmp_path / "export")
    block = _python_block(ROOT / "docs" / "api.md", 1)
    block = block.replace("demo_out/export", str(tmp_path / "export")).replace("demo_out/shards", str(tiny_shards))
    ns: dict = {}
    exec(block, ns)
    test_keys = {json.loads(line)["key"] for line in _sample_lines(tiny_shards, "test")}
    assert set(ns["keys"]) <= test_keys and ns["cls"].shape[1] == 192


def _sample_lines(shards: Path, split: str):
    m = json.loads((shards / "manifest.json").read_text())
    for s in m["shards"]:
        if s["split"] == split:
            yield from (shards / s["samples_file"]).read_text().splitlines()


def test_embed_doc_reads_the_parts_beside_embed_json(tmp_path):
    from echofm.engine.embed import META, PartWriter

    w = PartWriter(tmp_path, 0, 1, 1, {})  # one row per part: two parts
    for key in ("a", "b"):
        w.add([{"key": key, "clip": 0, "patient": "p", "study": "s", "view": "A4C", "split": "test",
                "labels": "{}", "embedding": np.ones(2, np.float32), "phase": np.zeros(2, np.float32)}])
    w.flush()
    (tmp_path / META).write_text("{}")
    ns: dict = {}
    exec(_python_block(ROOT / "docs" / "embed.md").replace("DIR", str(tmp_path)), ns)
    assert sorted(ns["table"].column("key").to_pylist()) == ["a", "b"]


# ---------------------------------------------------------------- one line, not a wrong run


def test_finetune_and_evaluate_refuse_a_pretrain_recipe(tmp_path, capsys):
    out = tmp_path / "runs"
    sets = ["--set", f"data.shards={tmp_path}", "--set", f"downstream.out_dir={out}"]
    assert main(["finetune", "echofm_tiny", *sets]) == 2
    line = _one_error_line(capsys)
    assert "echofm_tiny.yaml: does not set downstream.task or downstream.backbone" in line
    assert "--set downstream.backbone=" in line and not out.exists()
    assert main(["finetune", "echofm_tiny", *sets, "--set", "downstream.task=ef"]) == 2
    assert "does not set downstream.backbone, so it is not a downstream recipe" in _one_error_line(capsys)
    assert main(["evaluate", str(tmp_path), "--recipe", "echofm_tiny"]) == 2
    assert "does not set downstream.task" in _one_error_line(capsys)


def test_attention_backend_that_is_not_there_is_one_line(tmp_path, capsys):
    if shutil.which("nvidia-smi") and torch.cuda.is_available():
        pytest.skip("a CUDA machine may have xformers")
    assert main(["pretrain", "echofm_tiny", "--set", f"data.shards={tmp_path}",
                 "--set", "model.attn_backend=xformers"]) == 2
    assert "model.attn_backend=xformers: " in _one_error_line(capsys)
    from echofm.kernels import tube_attention
    from echofm.kernels.reference import BackendUnavailable

    q = torch.zeros(1, 1, 2, 4, 8)  # [B, H, T, K, Dh] on the CPU
    with pytest.raises(BackendUnavailable, match="xformers"):
        tube_attention(q, q, q, "joint", backend="xformers")


def test_a_file_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["synth", "--out", str(blocker / "corpus"), "--videos", "1", "--workers", "1"]) == 2
    line = _one_error_line(capsys)
    assert str(blocker / "corpus") in line and "Not a directory" in line


def test_evaluate_on_a_cohort_without_the_labels_is_one_line(tiny_shards, synth_corpus, tmp_path, capsys):
    """Regression: `echofm evaluate RUN --data UNLABELLED` died in a 28-line traceback
    (`cannot reshape array of size 0`)."""
    from echofm.engine.downstream.run import run
    from echofm.loaders.ingest import IngestConfig, ingest

    src = tmp_path / "videos"
    src.mkdir()
    rows = ["path,patient,split"]  # every clip in 'test', and no view column: no view labels
    for i, f in enumerate(sorted((synth_corpus / "videos").glob("*.mp4"))[:4]):
        shutil.copy(f, src / f.name)
        rows.append(f"{f.name},p{i},test")
    (src / "cohort.csv").write_text("\n".join(rows) + "\n")
    ingest([src / "cohort.csv"], tmp_path / "cohort", IngestConfig(size=112, progress=False))
    assert json.loads((tmp_path / "cohort" / "manifest.json").read_text())["splits"] == {"test": 4}
    small = ["model.depth=1", "model.embed_dim=64", "model.num_heads=2", "model.decoder_embed_dim=32",
             "model.decoder_num_heads=2", "model.decoder_depth=1"]
    r = load_recipe("synthetic_view", [f"data.shards={tiny_shards}", "downstream.backbone=random",
                                       f"downstream.out_dir={tmp_path}", "downstream.epochs=5",
                                       "downstream.select_wd=false", "downstream.bootstrap=10", *small])
    run(r, log=lambda *_: None)
    assert main(["evaluate", str(tmp_path / r.name), "--data", str(tmp_path / "cohort")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"echofm: error: {tmp_path / 'cohort'}: split 'test': no labelled videos for task 'view'")


# ---------------------------------------------------------------- no document users do not have


def test_no_reference_to_a_document_outside_the_repository():
    """What a user can read (code, docstrings, recipes, benchmarks, docs) cites the docs/
    pages, never the maintainers' notes (`help(EchoFM)` showed "DESIGN §5")."""
    cited = re.compile(r"DESIGN §|DESIGN\.md|PLATFORM\.md|STYLE\.md|\.\./shared")
    files = [p for folder in ("engine", "loaders", "kernels", "benchmarks", "recipes", "docs", "echofm")
             for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md", ".sh")]
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in files + [ROOT / "README.md", ROOT / "setup.py"]
           for i, line in enumerate(p.read_text().splitlines(), 1) if cited.search(line)]
    assert not bad, f"cites a document users do not have: {bad}"
    from echofm.engine.model import EchoFM

    assert "DESIGN" not in (EchoFM.__doc__ or "")
