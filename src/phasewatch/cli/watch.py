"""``phasewatch watch``: follow a run from the terminal, refreshing on an interval.

Shows step, loss, k*, gap ratio, A, C/p with phase, α and the events so far; optionally re-renders
the overview figure."""

from __future__ import annotations

import argparse

from ..errors import PhasewatchError


def cmd_watch(a: argparse.Namespace) -> int:
    """Run ``phasewatch watch`` with the parsed arguments; return the exit status."""
    from ..outputs.watch import watch

    if a.interval <= 0:
        raise PhasewatchError(f"--interval {a.interval:g}: must be positive seconds")
    try:
        watch(a.run, window=a.window, interval=a.interval, once=a.once, figure=a.figure, idle_exit=a.idle_exit)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how watching ends
    return 0


def register(sub) -> None:
    """Add ``phasewatch watch`` and its options to the CLI's subparsers."""
    s = sub.add_parser("watch", help="a compact summary of a (live) run, refreshed every few seconds",
                       description=__doc__)
    s.add_argument("run", help="run directory or packed .h5 file")
    s.add_argument("--window", "-w", type=int, default=10, help="Gram window W (default 10)")
    s.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    s.add_argument("--once", action="store_true", help="print the summary once and exit")
    s.add_argument("--figure", metavar="PATH", help="also re-render the overview figure to PATH (.pdf/.png/.svg)")
    s.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="stop when the run has not grown for this long (a crashed run never closes)")
    s.set_defaults(func=cmd_watch)
