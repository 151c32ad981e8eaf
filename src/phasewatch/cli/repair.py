"""``phasewatch repair RUN``: after a crash, rewrite the segments with their committed rows."""

from __future__ import annotations

import argparse


def cmd_repair(a: argparse.Namespace) -> int:
    from ..store import repair_run

    for line in repair_run(a.run):
        print(line)
    return 0


def register(sub) -> None:
    s = sub.add_parser("repair", help="after a crash: rewrite segments with their committed rows")
    s.add_argument("run")
    s.set_defaults(func=cmd_repair)
