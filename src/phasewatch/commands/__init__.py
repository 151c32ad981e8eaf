"""Extra ``phasewatch`` subcommands, one module each.

Every module here defines ``register(sub)`` that adds its parser(s) to the CLI's subparsers and
sets ``func``; ``ORDER`` (an int, default 100) places it in ``phasewatch --help``.  Keeping each
command in its own module lets commands grow without touching ``cli.py``.  Modules must import
heavy dependencies (torch, matplotlib) inside their command functions, not at import time.
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all(sub) -> None:
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            mods.append((getattr(mod, "ORDER", 100), info.name, mod))
    for _, _, mod in sorted(mods, key=lambda m: (m[0], m[1])):
        mod.register(sub)
