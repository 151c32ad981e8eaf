"""``phasewatch demo``: train, record, analyse and plot the grokking demo.

The work is :func:`phasewatch.workflows.demo.run_demo`."""

from __future__ import annotations

import argparse


def cmd_demo(a: argparse.Namespace) -> int:
    """Run ``phasewatch demo`` with the parsed arguments; return the exit status."""
    from ..workflows.demo import run_demo

    run_demo(a.out, steps=a.steps, window=a.window, weight_decay=a.weight_decay, seed=a.seed,
             control=a.control, overwrite=a.overwrite)
    return 0


def register(sub) -> None:
    """Add ``phasewatch demo`` and its options to the CLI's subparsers."""
    s = sub.add_parser("demo", help="train, record, analyse and plot the grokking demo (~1 min on CPU)")
    s.add_argument("--out", "-o", default="demo-out", help="output directory (default demo-out)")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--window", type=int, default=10)
    s.add_argument("--weight-decay", type=float, default=2e-4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--control", action="store_true", help="also train the weight-decay-0 control run")
    s.add_argument("--overwrite", action="store_true", help="replace existing runs in --out")
    s.set_defaults(func=cmd_demo)
