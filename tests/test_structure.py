"""The layout rules of docs/architecture.md, checked on the source: the engine (core/) imports no
Gradio, no module of core/ imports another in a cycle (not even from inside a function), and no
function in core/ or ui/ is longer than MAX_LINES unless a comment on the line above its ``def``
(``# long: <why>``) says why."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def _modules(package: str) -> dict[str, ast.Module]:
    return {f"{package}.{p.stem}": ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
            for p in sorted((ROOT / package).glob("*.py")) if p.stem != "__init__"}


def _imports(tree: ast.Module, package: str) -> set[str]:
    """Every module of ``package`` that ``tree`` imports, at any depth (inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == package:   # from core import a, b
                found |= {f"{package}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith(package + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]   # on the current path: the cycle closes here
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_engine_imports_no_gradio():
    offenders = []
    for name, tree in _modules("core").items():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("gradio", "gradio_client", "ui")]
    assert offenders == []


def test_no_import_cycle_in_the_engine():
    modules = _modules("core")
    graph = {name: _imports(tree, "core") - {name} for name, tree in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _long_functions(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).glob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if length > MAX_LINES and not above.startswith("# long:"):
                out.append(f"{package}/{path.name}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_functions_are_short_or_say_why():
    assert _long_functions("core") + _long_functions("ui") == []
