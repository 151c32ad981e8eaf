"""``phasewatch info RUN``: what a run holds."""

from __future__ import annotations

import argparse


def cmd_info(a: argparse.Namespace) -> int:
    from ..store import open_run

    run = open_run(a.run)
    print(run.summary())
    return 0


def register(sub) -> None:
    s = sub.add_parser("info", help="what a run holds: model, optimizer, recorder, steps, segments")
    s.add_argument("run", help="run directory or packed .h5 file")
    s.set_defaults(func=cmd_info)
