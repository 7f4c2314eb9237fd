"""The layers of ARCHITECTURE.md section 3, checked from the source: diffx's modules import each other
without a cycle (lazy imports inside functions included), and no command imports another command."""

import ast
from pathlib import Path

import diffx

PACKAGE = Path(diffx.__file__).resolve().parent
COMMANDS = {"diffx.train", "diffx.sample", "diffx.evaluate", "diffx.calibrate", "diffx.interpolate",
            "diffx.train_vae", "diffx.report", "diffx.fit_laplace", "diffx.distill_cmd"}


def _modules() -> dict[str, Path]:
    """Every module under diffx/ by dotted name; a package is its ``__init__.py`` (``diffx.samplers``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The diffx modules that ``name`` names in any import statement, at module level or in a function.

    ``from diffx import x`` counts as an import of ``diffx.x`` when that is a module, else of ``diffx``
    itself; importing ``diffx.a.b`` counts as an edge to ``diffx.a.b`` only, not to the package ``diffx.a``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from .x import y`
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None: depth-first search, iterative."""
    state = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the current path, 2 done
    for root in sorted(graph):
        if state[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_finder_sees_every_kind_of_import():
    graph = _graph()
    assert "diffx.errors" in graph["diffx.checkpoint"]  # `from diffx.errors import DiffxError`
    assert "diffx.resume" in graph["diffx.config"]  # lazy, inside run_dir
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_diffx_modules_import_each_other_without_a_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_general_modules_import_nothing_from_diffx():
    graph = _graph()
    assert graph["diffx.errors"] == set()
    assert graph["diffx.atomic"] == set()


def test_no_command_imports_another_command():
    graph = _graph()
    crossings = sorted(f"{a} -> {b}" for a in COMMANDS & graph.keys() for b in graph[a] & COMMANDS)
    assert not crossings, f"a command imports another command: {', '.join(crossings)}"


def test_parts_are_told_apart_by_what_they_declare_not_by_their_class():
    """Condition sources declare ``guidable`` / ``tells``; samplers declare ``deterministic`` and a fitted
    one its own ``ts``: no code asks for a class or a ``_target_`` string to decide."""
    import re

    pattern = re.compile(r"type\(.*\) is |isinstance\([^,]+, *\(?(conditioning\.|Labels|Text|Unconditional|"
                         r"LinearSolver)|_target_ ==")
    found = [f"{path.name}:{i}" for path in _modules().values()
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
