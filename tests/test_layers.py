"""The house plan, checked on the source (README: What is where): layers import one way, no module
of engine/, loaders/ or kernels/ is part of an import cycle or over 600 lines, no function is over
80 lines.

Every module is parsed with `ast`, imports inside functions included (a lazy import that
dodges a cycle is still a cycle). Each test lists every offender, not only the first.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("engine", "loaders", "kernels")
MAX_LINES = 80
MAX_MODULE_LINES = 600
"""A module longer than this holds more than one job (README: What is where): split it by role."""
LOWER = {"kernels": (), "loaders": (), "engine": ("kernels", "loaders")}
"""What each layer may import of ours besides itself (README: What is where)."""


@dataclass(frozen=True)
class Module:
    name: str
    """Dotted name under the installed package, e.g. 'echofm.engine.trainer'."""
    path: Path
    tree: ast.Module

    @property
    def layer(self) -> str:
        return self.name.split(".")[1]


def _modules() -> dict[str, Module]:
    out = {}
    for layer in LAYERS:
        for f in sorted((ROOT / layer).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = "echofm." + ".".join(parts)
            out[name] = Module(name, f, ast.parse(f.read_text(), filename=str(f)))
    return out


MODULES = _modules()


def _targets(mod: Module, node: ast.Import | ast.ImportFrom, modules: dict[str, Module]) -> list[str]:
    """The modules of ours an import statement loads (a package's `from . import x` -> x)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = mod.name.split(".")
            if mod.path.name != "__init__.py":
                pkg = pkg[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return [n for n in names if n in modules and n != mod.name]


def import_graph(modules: dict[str, Module] = MODULES) -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its body."""
    return {mod.name: {t for node in ast.walk(mod.tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in _targets(mod, node, modules)} for mod in modules.values()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def long_functions(modules: dict[str, Module] = MODULES, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (N lines)' of every function (methods and nested ones too) over `limit`."""
    out = []
    for mod in modules.values():
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{mod.path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return sorted(out)


def test_the_checker_finds_a_lazy_cycle_and_a_long_function():
    """The checks themselves can fail: a cycle through a function-level import, a long body."""
    src = "def f():\n    from . import b\n" + "    x = 1\n" * 90
    fake = {m.name: m for m in (Module("echofm.engine.a", ROOT / "engine/a.py", ast.parse(src)),
                                Module("echofm.engine.b", ROOT / "engine/b.py", ast.parse("from .a import f\n")))}
    assert cycles(import_graph(fake)) == [["echofm.engine.a", "echofm.engine.b"]]
    assert long_functions(fake) == ["engine/a.py:1 f (92 lines)"]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)
    # the graph sees a sub-package's relative imports (loaders/sources/load.py -> base.py), one way
    load, base = "echofm.loaders.sources.load", "echofm.loaders.sources.base"
    assert base in graph[load] and load not in graph[base]


def test_layers_import_one_way():
    """kernels and loaders import nothing of ours outside their own package; engine may import both."""
    bad = sorted(f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
                 if MODULES[t].layer != MODULES[m].layer and MODULES[t].layer not in LOWER[MODULES[m].layer])
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_no_module_over_600_lines():
    found = sorted(f"{m.path.relative_to(ROOT)} ({n} lines)" for m in MODULES.values()
                   if (n := len(m.path.read_text().splitlines())) > MAX_MODULE_LINES)
    assert not found, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(found)


def test_no_function_over_80_lines():
    found = long_functions()
    assert not found, f"functions over {MAX_LINES} lines:\n" + "\n".join(found)


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_parsed(layer):
    assert any(m.layer == layer for m in MODULES.values())
