"""``phasewatch study RUN... --event RULE --signal NAME [--onset RULE]``: a precursor study."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PhasewatchError
from .common import add_workers, formats, report_failures

EPILOG = """
examples:
  phasewatch study runs/wd-* runs/no-wd-* --event "test_acc>=0.95" --signal g23 --out study/
  phasewatch study runs/* --signal kstar --onset change --param sustain=3
  phasewatch study runs/* --signal C --onset "<1" --param sustain=5

named signals (default onset rule): kstar (change), gap_ratio (ratio_change factor=2 baseline=20),
g23 (decline factor=1.5: the paper's rule), A (enter regime 1), C (cross level=1), phi (peak),
alpha (drop amount=0.5); any other column needs --onset.
"""


def parse_params(items: list[str] | None) -> dict:
    """``["factor=2", "direction=up"]`` -> ``{"factor": 2.0, "direction": "up"}`` (ints stay ints)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise PhasewatchError(f"--param {item!r}: write NAME=VALUE, e.g. --param factor=2")
        k, v = item.split("=", 1)
        k, v = k.strip(), v.strip()
        if k == "when":
            out[k] = v
            continue
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def cmd_study(a: argparse.Namespace) -> int:
    """Run ``phasewatch study`` with the parsed arguments; return the exit status."""
    from ..workflows.study import run_study

    if a.label and len(a.label) != len(a.runs):
        raise PhasewatchError(f"--label given {len(a.label)} times for {len(a.runs)} runs; give one per run")
    study = run_study(
        a.runs, event=a.event, signal=a.signal, onset=a.onset, params=parse_params(a.param), labels=a.label,
        window=a.window, alternative=a.alternative, min_lead=a.min_lead, event_sustain=a.event_sustain,
        n_shifts=a.shifts, level=a.level, seed=a.seed, workers=a.workers, skip_failed=True)
    print(study.to_markdown(), end="")
    if a.out:
        fm = formats(a.format)
        for p in study.write(Path(a.out), formats=fm, figure=not a.no_figure):
            print(f"wrote {p}")
    return report_failures(study.failed)


def register(sub) -> None:
    """Add ``phasewatch study`` and its options to the CLI's subparsers."""
    s = sub.add_parser("study", help="precursor study over runs: lead times, hit and false-alarm rates",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("runs", nargs="+", metavar="RUN", help="run directories or packed .h5 files")
    s.add_argument("--event", default="test_acc>=0.95",
                   help="event rule: first evaluation where it holds (default \"test_acc>=0.95\")")
    s.add_argument("--event-sustain", type=int, default=1, help="evaluations the event rule must hold (1)")
    s.add_argument("--signal", default="g23", help="signal column or named signal (default g23)")
    s.add_argument("--onset", help="onset rule: change, ratio_change, decline, enter, cross, peak, drop, rise, "
                                   "or a threshold like \"<1\" (default: the signal's named rule)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE", help="onset rule parameter (repeatable)")
    s.add_argument("--label", action="append", help="label of each run in order (repeatable)")
    s.add_argument("--window", "-w", type=int, default=10, help="Gram window W (default 10)")
    add_workers(s)
    s.add_argument("--alternative", choices=["lead", "lag", "either"], default="lead",
                   help="what the shift and permutation tests look for (default lead)")
    s.add_argument("--min-lead", type=float, default=1, help="smallest τ counted as a hit (default 1 step)")
    s.add_argument("--shifts", type=int, help="random circular shifts (default: all of them up to 2000)")
    s.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", "-o", help="directory for study.md, study.json and the figure")
    s.add_argument("--format", nargs="+", default=["md", "json"], help="md and/or json (default both)")
    s.add_argument("--no-figure", action="store_true", help="do not draw study.pdf/.png")
    s.set_defaults(func=cmd_study)
