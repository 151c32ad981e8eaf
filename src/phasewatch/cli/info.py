"""``phasewatch info RUN``: what a run holds."""

from __future__ import annotations

import argparse


def cmd_info(a: argparse.Namespace) -> int:
    """Run ``phasewatch info`` with the parsed arguments; return the exit status."""
    from ..store import open_run

    run = open_run(a.run)
    print(run.summary())
    return 0


def register(sub) -> None:
    """Add ``phasewatch info`` and its options to the CLI's subparsers."""
    s = sub.add_parser("info", help="what a run holds: model, optimizer, recorder, steps, segments")
    s.add_argument("run", help="run directory or packed .h5 file")
    s.set_defaults(func=cmd_info)
