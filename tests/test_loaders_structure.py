"""House rules for the data path that a reader relies on: no import cycle among loaders/
(lazy, function-level imports count), and no function over 80 lines in the ingest modules."""
import ast
from pathlib import Path

LOADERS = Path(__file__).resolve().parents[1] / "loaders"
INGEST_MODULES = ("ingest", "sector", "cycles", "video_io", "quality", "workers", "ids",
                  "sources/base", "sources/load", "sources/files", "sources/csv", "sources/dicom",
                  "sources/camus", "sources/echonet", "sources/__init__")


def _module(path: Path) -> str:
    rel = path.relative_to(LOADERS).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of loaders/ that `path` imports anywhere in it (top level or inside functions)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else []
            names += [f"{target}.{a.name}".lstrip(".") for a in node.names]
            out |= {n for n in names if n}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("echofm.loaders"):
            out.add(node.module.removeprefix("echofm.loaders").lstrip("."))
    known = {_module(p) for p in LOADERS.rglob("*.py")}
    return {m for m in out if m in known and m != me}


def test_no_import_cycle_among_loaders():
    graph = {_module(p): _imports(p) for p in LOADERS.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    assert graph["sources.load"] >= {"sources.base"} and "sources.load" not in graph["sources.base"]


def test_ingest_functions_fit_on_a_screen():
    long = []
    for name in INGEST_MODULES:
        path = LOADERS / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
