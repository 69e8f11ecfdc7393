"""The package's layers (qwen_convert/__init__.py lists them): every import, at module level or inside a
function, points down the list or stays inside its own package, and no modules import each other in a
circle. Parsed from the source, so a lazy import cannot hide an upward edge or a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_convert"

# Lowest first. A module may import its own package and any package of a lower layer.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer) for layer in (
    {"__init__", "errors", "extras", "progress", "fsutil", "versions", "formats", "reranker", "fixtures"},
    {"checkpoint"},
    {"hub"},
    {"seqcls"},
    {"scoring"},
    {"verify"},
    {"onnx"},
    {"pipeline"},
    {"serve", "inspect"},  # the server and `qconv inspect` need nothing of each other
    {"cli"},
))
CORE = LAYERS[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every qwen_convert module this file imports (absolute names), wherever the import statement is."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "qwen_convert"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "qwen_convert":
                module = node.module
            else:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                out.add(sub if _exists(sub) else module)
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level package, or the module itself at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    unit = _unit(module)
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer: add {unit!r} to LAYERS (and to qwen_convert/__init__.py's list)")


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_no_import_points_up_a_layer():
    upward = []
    for module, imports in _graph().items():
        for target in imports:
            same_unit = _unit(target) == _unit(module)
            if not same_unit and _layer(target) >= _layer(module) and not (_unit(target) in CORE and _unit(module) in CORE):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up (or sideways) a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The parser must catch an upward import hidden in a function, written relative."""
    pkg = tmp_path / "qwen_convert"
    (pkg / "checkpoint").mkdir(parents=True)
    (pkg / "verify").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "checkpoint" / "__init__.py").write_text("")
    (pkg / "verify" / "__init__.py").write_text("")
    (pkg / "verify" / "run.py").write_text("from ..checkpoint import files\n")
    (pkg / "checkpoint" / "files.py").write_text("def f():\n    from ..verify.run import g\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"qwen_convert\.checkpoint\.files -> qwen_convert\.verify\.run"):
        test_no_import_points_up_a_layer()
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()


def test_no_module_grows_past_500_lines():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them by concern): {long}"


def test_no_function_grows_past_90_lines():
    """A top-level function reads as the steps it takes; past ~80 lines its steps want names of their own."""
    long = [f"{_module_name(p)}.{node.name}: {node.end_lineno - node.lineno + 1}"
            for p in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 90]
    assert not long, f"functions over 90 lines: {long}"
