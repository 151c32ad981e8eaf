"""``phasewatch repair RUN``: after a crash, rewrite the segments with their committed rows."""

from __future__ import annotations

import argparse


def cmd_repair(a: argparse.Namespace) -> int:
    """Run ``phasewatch repair`` with the parsed arguments; return the exit status."""
    from ..store import repair_run

    for line in repair_run(a.run):
        print(line)
    return 0


def register(sub) -> None:
    """Add ``phasewatch repair`` and its options to the CLI's subparsers."""
    s = sub.add_parser("repair", help="after a crash: rewrite segments with their committed rows")
    s.add_argument("run")
    s.set_defaults(func=cmd_repair)
