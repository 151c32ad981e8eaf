"""A griffe extension for the docs build: Sphinx roles in docstrings become Markdown.

The docstrings use reST roles (``:func:`hill```, ``:class:`~phasewatch.store.Run```, relative
``:mod:`.style```), which mkdocstrings would print literally.  Each role becomes inline code, and a
cross-reference when its target is an object that the API reference renders (a public object of a
module listed in ``DOCUMENTED``); anything else stays inline code, so no link can dangle.
"""

from __future__ import annotations

import re

import griffe

# the modules whose public members the API reference pages render (docs/api/*.md)
DOCUMENTED = (
    "phasewatch.analysis.gram", "phasewatch.analysis.nulls", "phasewatch.analysis.adiabatic",
    "phasewatch.analysis.noise", "phasewatch.analysis.gradcov", "phasewatch.analysis.tails",
    "phasewatch.analysis.curvature", "phasewatch.analysis.events", "phasewatch.analysis.leadtime",
    "phasewatch.curvature", "phasewatch.plot", "phasewatch.outputs.report",
)
# single objects rendered on their own (docs/api/phasewatch.md, docs/api/recorder.md)
DOCUMENTED_OBJECTS = (
    "phasewatch.analysis.pipeline.analyze", "phasewatch.analysis.pipeline.Analysis",
    "phasewatch.store.open_run", "phasewatch.record.recorder.Recorder",
)

ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")


def _module_of(obj: griffe.Object) -> griffe.Module:
    while not obj.is_module:
        obj = obj.parent
    return obj


def _lookup(pkg: griffe.Module, path: str):
    if path == pkg.path:
        return pkg
    if not path.startswith(pkg.path + "."):
        return None
    try:
        return pkg[path[len(pkg.path) + 1:]]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _candidates(obj: griffe.Object, target: str) -> list[str]:
    mod = _module_of(obj)
    if target.startswith("."):
        # relative to the package (an __init__) or to the module's parent package
        base = mod.path if mod.is_package else mod.path.rpartition(".")[0]
        dots = len(target) - len(target.lstrip("."))
        for _ in range(dots - 1):
            base = base.rpartition(".")[0]
        return [f"{base}.{target.lstrip('.')}"]
    out = [target]
    scope = obj
    while scope is not None:
        out.append(f"{scope.path}.{target}")
        scope = scope.parent
    return out


def _documented(path: str, found) -> bool:
    if found is None or any(part.startswith("_") for part in path.split(".")):
        return False
    if path in DOCUMENTED_OBJECTS or path in DOCUMENTED:
        return True
    for mod in DOCUMENTED:
        if path.startswith(mod + "."):
            rest = path[len(mod) + 1:]
            # members of a documented module, or methods of its classes
            return rest.count(".") <= 1 and found.docstring is not None
    return False


def _rewrite(pkg: griffe.Module, obj: griffe.Object, text: str) -> str:
    def repl(m: re.Match) -> str:
        tilde, target = m.group(2), m.group(3).strip()
        shown = target.lstrip(".")
        if tilde:
            shown = shown.rpartition(".")[2]
        for path in _candidates(obj, target):
            found = _lookup(pkg, path)
            if found is not None:
                if _documented(path, found):
                    return f"[`{shown}`][{path}]"
                break
        return f"`{shown}`"

    return ROLE.sub(repl, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring in the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:  # noqa: D102
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(pkg, obj, obj.docstring.value)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
