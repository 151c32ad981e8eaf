"""``phasewatch compare RUN... --by ATTRIBUTE``: final metrics and diagnostics across runs (a sweep).

The table is :func:`phasewatch.workflows.compare.compare_table`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from ..errors import PhasewatchError
from .common import add_workers, formats, report_failures


def cmd_compare(a: argparse.Namespace) -> int:
    """Run ``phasewatch compare`` with the parsed arguments; return the exit status."""
    from ..workflows.compare import compare_table, to_csv, to_json, to_markdown

    failed: list[tuple[str, str]] = []
    rows, cols = compare_table(a.runs, a.by, a.window, workers=a.workers, failed=failed)
    print(to_markdown(rows, cols), end="")
    if not a.out:
        return report_failures(failed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in formats(a.format):
        if f == "md":
            p = out / "compare.md"
            p.write_text(to_markdown(rows, cols))
        elif f == "csv":
            p = out / "compare.csv"
            p.write_text(to_csv(rows, cols))
        elif f == "json":
            p = out / "compare.json"
            p.write_text(to_json(rows, a.by))
        else:
            raise PhasewatchError(f"--format {f}: use md, csv and/or json")
        print(f"wrote {p}")
    if not a.no_figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..plot.multirun import sweep
        from ..plot.style import save

        want = a.columns or [c for c in cols if c not in ("run", a.by)]
        ys = {}
        for c in want:
            if c not in cols:
                raise PhasewatchError(f"--columns {c}: not a column of the table; choose from {', '.join(cols[2:])}")
            v = np.array([r.get(c, math.nan) for r in rows], dtype=float)
            if np.isfinite(v).any():
                ys[c] = v
        fig = sweep([r[a.by] for r in rows], ys, xlabel=a.by)
        for f in ("pdf", "png"):
            p = out / f"sweep.{f}"
            save(fig, p, f)
            print(f"wrote {p}")
        plt.close(fig)
    return report_failures(failed)


def register(sub) -> None:
    """Add ``phasewatch compare`` and its options to the CLI's subparsers."""
    s = sub.add_parser("compare", help="final metrics and diagnostics across runs, by an attribute (a sweep)")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("--by", required=True,
                   help="attribute from the run's metadata: a user attribute (Recorder(meta=...)), an optimizer "
                        "hyper-parameter (lr, weight_decay), or a dotted path like optimizer.hyper.lr")
    s.add_argument("--window", "-w", type=int, default=10, help="Gram window W (default 10)")
    add_workers(s)
    s.add_argument("--out", "-o", help="directory for compare.md/.csv/.json and sweep.pdf/.png")
    s.add_argument("--format", nargs="+", default=["md", "csv", "json"], help="md, csv, json (default all)")
    s.add_argument("--columns", nargs="+", help="columns to plot in the sweep figure (default all with numbers)")
    s.add_argument("--no-figure", action="store_true")
    s.set_defaults(func=cmd_compare)
