"""``phasewatch report RUN [--out DIR] [--format md json]``: a run's report, section by section."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import formats


def cmd_report(a: argparse.Namespace) -> int:
    """Run ``phasewatch report`` with the parsed arguments; return the exit status."""
    from ..outputs.report import build_report, report_markdown, write_report

    rep = build_report(a.run, window=a.window, level=a.level, layers=a.layers)
    if a.out:
        for p in write_report(rep, Path(a.out), formats(a.format)):
            print(f"wrote {p}")
    else:
        print(report_markdown(rep), end="")
    return 0


def register(sub) -> None:
    """Add ``phasewatch report`` and its options to the CLI's subparsers."""
    s = sub.add_parser("report", help="a run's report: events, phases, k*, A, C/p, flags, alpha, S, forecast")
    s.add_argument("run", help="run directory or packed .h5 file")
    s.add_argument("--window", "-w", type=int, default=10, help="Gram window W (default 10)")
    s.add_argument("--level", type=float, default=0.95, help="confidence level of intervals (default 0.95)")
    s.add_argument("--layers", action="store_true", help="add the per-layer section (first group to lock in)")
    s.add_argument("--out", "-o", help="directory for report.md / report.json (default: markdown to stdout)")
    s.add_argument("--format", nargs="+", default=["md", "json"], help="md and/or json (default both)")
    s.set_defaults(func=cmd_report)
