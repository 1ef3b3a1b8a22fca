"""The package's layers, checked from the source: no import circle, no long file.

Layers (docs/architecture.md): ``_constants``/``_safe_load``/``data`` < ``module``/``embeddings``
< ``model`` < ``benchmark``/``probe`` < ``tl``/``pl`` < ``cli``. An import may only point down.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "perturbscope"
MAX_LINES = 600
#: Subpackage (or top-level module) -> layer; imports must go to the same or a lower layer.
LAYERS = {
    "_constants": 0, "_safe_load": 0, "_pickle_budget": 0, "_pickle_nesting": 0, "_pickle_checks": 0, "_pickle_allow": 0, "_choices": 0, "_logging": 0, "data": 1, "module": 2, "embeddings": 2, "effects": 2, "model": 3,
    "benchmark": 4, "probe": 4, "tl": 5, "pl": 5, "_demo": 6, "cli": 6, "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported perturbscope module, inside a function)`` for every import of the package."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    in_function = {
        id(node)
        for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("perturbscope"):
                # ``from . import x`` imports the submodule x
                names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
                found += [(t, id(node) in in_function) for t in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in in_function) for a in node.names if a.name.startswith("perturbscope")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target, _ in _imports(path):
            while target not in modules and "." in target:  # an attribute, not a module
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circle_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_circle_between_subpackages():
    rooms: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module == "perturbscope":
            continue  # the top-level __init__ re-exports everything
        rooms.setdefault(_room(module), set()).update(
            _room(t) for t in targets if _room(t) != _room(module)
        )
    assert _cycles(rooms) == []


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        room = _room(module)
        if room == "__init__":
            continue
        for target in targets:
            if LAYERS[_room(target)] > LAYERS[room]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_package_import_hidden_in_a_function():
    # only the command line defers imports, so that ``perturbscope --help`` stays fast
    hidden = [
        f"{_module_name(p)} -> {target}"
        for p in PACKAGE.rglob("*.py") if p.name != "cli.py"
        for target, in_function in _imports(p) if in_function
    ]
    assert hidden == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_source_files_are_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
