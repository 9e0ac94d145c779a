"""Hostile recipes (issue 29): an alias bomb, a recursive alias, 1000-deep nesting and a huge
wrongly typed value all end in one ConfigError line naming the file, fast."""
import time

import pytest

from echofm.engine.config import load_recipe
from echofm.engine.errors import ConfigError
from echofm.engine.yaml_io import MAX_NODES, apply_overrides, parse_yaml, read_yaml, short_repr


def _laughs(levels: int, width: int = 9) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines)


def test_billion_laughs_as_a_wrongly_typed_value_is_refused_fast(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text("data:\n  shards: &bomb\n    - &a0 lol\n" + "\n".join(
        f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_recipe(p, [])
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert msg.startswith(str(p)) and "aliases expand to more than" in msg and "\n" not in msg and len(msg) < 300


def test_an_alias_bomb_at_the_top_level_and_a_recursive_alias_are_refused(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(_laughs(9))
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES:,} nodes"):
        read_yaml(p)
    p.write_text("a: &x [1, *x]\n")
    with pytest.raises(ConfigError, match=r"alias \*x refers to an anchor that is not complete"):
        read_yaml(p)


def test_ordinary_anchors_still_work():
    assert parse_yaml("a: &x {lr: 1e-4, n: [1, 2]}\nb: *x\n") == {"a": {"lr": 1e-4, "n": [1, 2]},
                                                                   "b": {"lr": 1e-4, "n": [1, 2]}}
    assert parse_yaml(_laughs(4, width=9))["a4"][0][0][0][0] == "lol"  # 9**4 = 6,561 nodes: allowed


def test_1000_deep_nesting_is_one_line(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("model:\n  depth: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: nested deeper than 64 levels \(line 2\)"):
        load_recipe(p, [])
    p.write_text("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 1000)))
    with pytest.raises(ConfigError, match="nested deeper"):
        read_yaml(p)


def test_a_type_error_prints_a_truncated_value(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("data:\n  shards: [" + ", ".join(str(i) for i in range(5_000)) + "]\n"
                 "train:\n  lr: '" + "x" * 100_000 + "'\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p, [])
    assert len(str(e.value)) < 300 and "..." in str(e.value)
    assert len(short_repr(list(range(10**6)))) < 100
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["a=[" + "1," * 10_000])
    assert len(str(e.value)) < 400
