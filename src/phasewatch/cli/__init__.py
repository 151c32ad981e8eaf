"""The ``phasewatch`` command line: :func:`main` parses and dispatches (:mod:`.main`).

Every subcommand is one thin module here defining ``register(subparsers)``.  Commands import heavy
dependencies (torch, matplotlib) inside their functions, so ``phasewatch --help`` stays fast."""

from .main import main

__all__ = ["main"]
