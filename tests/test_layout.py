"""The package's shape, checked: no import cycles, the import directions of DESIGN.md, size limits.

Read statically (``ast``) from ``src/phasewatch``, so a cycle that only a particular import order
would expose is still found.  Imports inside functions are deferred on purpose (torch, matplotlib,
h5py at the edges) and are not part of the module graph; the direction rules check them too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import phasewatch

SRC = Path(phasewatch.__file__).resolve().parent
MAX_MODULE_LINES = 800  # issue 16: "no module over ~800 lines"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """Modules of this package (and external top-level packages) that ``name`` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # module level, `if TYPE_CHECKING:` blocks included (a type-only import still ties the modules)
    nodes = [n for top in tree.body for n in ([top, *ast.walk(top)] if isinstance(top, ast.If) else [top])] \
        if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for a in node.names:  # `from . import x` imports the module x when there is one
                if f"{mod}.{a.name}" in modules:
                    found.add(f"{mod}.{a.name}")
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(name, path, modules, top_level_only=True) if d in modules and d != name}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for d in list(deps):
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) != name)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # a package's own parents run first
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert len(graph) > 100, "the module scan found too few modules"
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_import_directions_of_the_design():
    """analysis never imports torch, matplotlib, h5py or record/plot/cli; only store touches h5py;
    plot does not import record."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        deps = _imports(name, path, modules, top_level_only=False)
        tops = {d.split(".")[0] for d in deps}
        sub = {".".join(d.split(".")[:2]) for d in deps if d.startswith("phasewatch.")}
        if name.startswith("phasewatch.analysis"):
            bad += [(name, d) for d in tops & {"torch", "matplotlib", "h5py"}]
            bad += [(name, d) for d in sub & {"phasewatch.record", "phasewatch.plot", "phasewatch.cli"}]
        if "h5py" in tops and not name.startswith("phasewatch.store"):
            bad.append((name, "h5py"))
        if name.startswith("phasewatch.plot") and "phasewatch.record" in sub:
            bad.append((name, "phasewatch.record"))
    assert not bad, f"imports against DESIGN.md's direction: {bad}"


def test_no_module_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    over = {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them): {over}"


MAX_FUNCTION_LINES = 120  # issue 16: "no function over ~120 lines" (docstring included)


def test_no_function_over_the_size_limit():
    over = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    over.append(f"{name}.{node.name} ({n} lines)")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (extract a coherent helper): {over}"
