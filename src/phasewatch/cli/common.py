"""Options and helpers shared by several commands.

They are public here so that no command reaches into another's module."""

from __future__ import annotations

import argparse
import sys


def add_window(p: argparse.ArgumentParser) -> None:
    """``--window`` and ``--source``: the same for analyze, plot and export."""
    p.add_argument("--window", "-w", type=int, default=10, help="Gram window W (default 10; at most K-1)")
    p.add_argument("--source", choices=["band", "snapshots"], default="band",
                   help="spectra from the per-step band (default) or from stored update snapshots")


def add_workers(s: argparse.ArgumentParser) -> None:
    """``--workers``: processes analysing many runs (study, compare)."""
    s.add_argument("--workers", "-j", type=int, default=1,
                   help="processes analysing the runs in parallel (default 1; 0: one per CPU); a run "
                        "that cannot be analysed is left out with its error and the exit status is 1")


def formats(value: list[str]) -> list[str]:
    """``["csv,json", "md"]`` -> ``["csv", "json", "md"]``: ``--format`` values split on commas and blanks."""
    out: list[str] = []
    for v in value:
        out += [x for x in v.replace(",", " ").split() if x]
    return out


def report_failures(failed: list[tuple[str, str]]) -> int:
    """One line on stderr per run left out; exit status 1 if any (the others' results stand)."""
    for _, why in failed:
        print(f"phasewatch: left out {why}", file=sys.stderr)
    return 1 if failed else 0
