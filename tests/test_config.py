"""Recipe loading: includes, --set overrides, strict validation with named errors."""
import subprocess
import sys

import pytest

from echofm.engine.config import ConfigError, dump_yaml, load_recipe


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_include_and_override(tmp_path):
    write(tmp_path, "base.yaml", "data:\n  num_frames: 32\n  size: 224\nmask:\n  ratio: 0.9\n")
    top = write(tmp_path, "top.yaml", "include: base.yaml\ndata:\n  size: 160\n")
    r = load_recipe(top, ["mask.ratio=0.8", "model.depth=6"])
    assert (r.data.num_frames, r.data.size) == (32, 160)  # base kept, top wins
    assert r.mask.ratio == 0.8 and r.model.depth == 6
    assert "num_frames: 32" in dump_yaml(r)


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    p = write(tmp_path, "r.yaml", "data:\n  num_framez: 8\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "data.num_framez" in msg and "num_frames" in msg


def test_wrong_type_and_literal(tmp_path):
    p = write(tmp_path, "r.yaml", "data:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got str"):
        load_recipe(p)
    p = write(tmp_path, "r2.yaml", "mask:\n  kind: cube\n")
    with pytest.raises(ConfigError, match=r"mask\.kind: expected 'tube' \| 'random' \| 'frame'"):
        load_recipe(p)


def test_validate_hook_named(tmp_path):
    p = write(tmp_path, "r.yaml", "mask:\n  ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"mask: ratio must be in"):
        load_recipe(p)


def test_include_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "include: b.yaml\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_one_line_error(tmp_path):
    p = write(tmp_path, "r.yaml", "model:\n  widht: 3\n")
    res = subprocess.run([sys.executable, "-m", "echofm.engine.cli", "config", "show", str(p)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.widht" in lines[0] and "Traceback" not in res.stderr


def test_shipped_recipes_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(root.rglob("*.yaml"))
    assert recipes
    for r in recipes:
        load_recipe(r)


def test_yaml_12_numbers_in_set_and_files(tmp_path, capsys):
    """`1e-4` is a float (YAML 1.1, which PyYAML follows, reads it as a string)."""
    from echofm.engine.cli import main

    r = load_recipe(write(tmp_path, "r.yaml", "optim:\n  lr: 1e-4\n  eps: 1.0e8\n"),
                    ["optim.weight_decay=5E-2", "optim.base_lr=+1.5e+3"])
    assert (r.optim.lr, r.optim.eps, r.optim.weight_decay, r.optim.base_lr) == (1e-4, 1e8, 0.05, 1500.0)
    assert type(r.optim.lr) is float
    assert main(["config", "show", str(tmp_path / "r.yaml"), "--set", "optim.lr=1e-4"]) == 0
    assert "lr: 0.0001" in capsys.readouterr().out
    # What is not a number stays a string (and is named when a number is expected).
    with pytest.raises(ConfigError, match=r"optim\.lr: expected .*float.*got str '1e'"):
        load_recipe(tmp_path / "r.yaml", ["optim.lr=1e"])


def test_recipe_validate_checks_across_sections(tmp_path):
    """One place for the checks no section can make (every entry point runs it); loading
    checks each section only, so a partial recipe loads and can be completed with --set."""
    from echofm.engine.model import ModelConfig

    p = write(tmp_path, "r.yaml", "data:\n  num_frames: 32\n  size: 224\n")
    r = load_recipe(p)  # tiny model (16 x 112^2) and no shards: loads
    with pytest.raises(ConfigError) as e:
        r.validate()
    msg = str(e.value)
    assert "data.num_frames=32 but the model expects model.num_frames=16" in msg
    assert "data.size=224 but the model expects model.img_size=112" in msg
    r = load_recipe(p, ["model.preset=echofm_vit_large"])  # 32 x 224^2
    with pytest.raises(ConfigError, match="data.shards: empty"):
        r.validate()
    r = load_recipe(p, ["model.preset=echofm_vit_large", "data.shards=somewhere"])
    r.validate()
    # a downstream run checks the clips against the backbone it loaded
    with pytest.raises(ConfigError, match="data.num_frames=32 but the backbone 'x' expects model.num_frames=16"):
        r.validate(ModelConfig(preset="echofm_tiny"), what="the backbone 'x'")
