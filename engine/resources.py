"""Where the shipped recipes and benchmark scripts are, and recipes by preset name.

`recipes/` and `benchmarks/` sit beside `engine/` in both layouts: the repository (a source
checkout, editable install) and an installed wheel, which maps them to `echofm/recipes` and
`echofm/benchmarks` (setup.py). So one path, relative to this file, finds them in either.
A leaf of the engine: it imports only errors.py.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The repository root (source checkout) or site-packages/echofm (wheel)."""
RECIPES = PACKAGE_ROOT / "recipes"
"""The shipped recipes: pretrain/*.yaml and downstream/*.yaml."""
BENCHMARKS = PACKAGE_ROOT / "benchmarks"
"""The benchmark scripts (`echofm bench NAME` runs BENCHMARKS/NAME.py) and results/."""
KINDS = ("pretrain", "downstream")
"""Sub-folders of RECIPES, searched in this order for a preset name."""


def recipe_names() -> dict[str, Path]:
    """{preset name: file} of every shipped recipe, pretrain first (a file stem is unique)."""
    return {p.stem: p for kind in KINDS for p in sorted((RECIPES / kind).glob("*.yaml"))}


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe argument -> its file. An existing path wins; else a preset name
    (`echofm_tiny`, `downstream/ef_regression`, with or without `.yaml`); else a path that
    starts with `recipes/` (as the docs write them) looked up among the shipped recipes.
    ConfigError naming the argument and the presets otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    text = str(spec).removesuffix(".yaml")
    names = recipe_names()
    if text in names:
        return names[text]
    parts = Path(text).parts
    if parts and parts[0] == "recipes":
        parts = parts[1:]
    if len(parts) == 2 and parts[0] in KINDS and (RECIPES / parts[0] / f"{parts[1]}.yaml").is_file():
        return RECIPES / parts[0] / f"{parts[1]}.yaml"
    if path.suffix in (".yaml", ".yml") or len(parts) > 1:
        raise ConfigError(f"{spec}: recipe file not found (or name a preset: `echofm config list`)")
    raise ConfigError(f"{spec}: no such recipe file or preset; presets: {', '.join(names)}")
