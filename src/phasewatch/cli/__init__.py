"""The ``phasewatch`` command line: :func:`main` parses and dispatches (:mod:`.main`).

Every subcommand is one thin module here defining ``register(subparsers)``.  Commands import heavy
dependencies (torch, matplotlib) inside their functions, so ``phasewatch --help`` stays fast.

``phasewatch.cli.main`` is the function (the console script ``phasewatch.cli:main``); the module
of the same name is reached with ``from phasewatch.cli.main import build_parser``, not with
``import phasewatch.cli.main as m``, which gives the function."""

from .main import main

__all__ = ["main"]
