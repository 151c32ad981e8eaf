"""``phasewatch plot RUN --out DIR``: the figures (PDF/PNG/SVG) of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PhasewatchError
from .common import add_window, formats


def cmd_plot(a: argparse.Namespace) -> int:
    """Run ``phasewatch plot`` with the parsed arguments; return the exit status."""
    import matplotlib

    matplotlib.use("Agg")
    from ..analysis.pipeline import analyze
    from ..plot import FIGURES, MissingDataError, save

    names = list(FIGURES) if a.figure == "all" else [a.figure]
    for n in names:
        if n not in FIGURES:
            raise PhasewatchError(f"--figure {n}: unknown figure; choose from {', '.join(FIGURES)} or all")
    fmts = formats(a.format)
    for f in fmts:
        if f not in ("pdf", "png", "svg"):
            raise PhasewatchError(f"--format {f}: use pdf, png or svg")
    if not 10 <= a.dpi <= 2400:
        raise PhasewatchError(f"--dpi {a.dpi:g}: use 10 to 2400 (PNG resolution; 300 for print)")
    from ..store import open_run

    run = open_run(a.run)
    res = analyze(run, window=a.window, source=a.source,
                  layers="layers" in names and "layer_band" in run.band and len(run.layer_names) > 0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    for n in names:
        try:
            fig = FIGURES[n](res, width=a.width)
        except MissingDataError as e:
            if a.figure != "all":
                raise
            msg = str(e).splitlines()[0]
            print(f"skipped {msg if msg.startswith(n) else f'{n}: {msg}'}")
            continue
        try:
            for f in fmts:
                path = out / f"{n}.{f}"
                save(fig, path, f, dpi=a.dpi)
                print(f"wrote {path}")
        finally:
            plt.close(fig)
    return 0


def register(sub) -> None:
    """Add ``phasewatch plot`` and its options to the CLI's subparsers."""
    s = sub.add_parser("plot", help="figures (PDF/PNG/SVG) from a run")
    s.add_argument("run")
    add_window(s)
    s.add_argument("--figure", default="all",
                   help="overview, noise, spectrum, hill, sharpness, ntk, criticality, layers, or all (default; "
                        "skips figures whose data the run lacks)")
    s.add_argument("--format", nargs="+", default=["pdf", "png"], help="pdf, png, svg (default pdf png)")
    s.add_argument("--width", choices=["column", "text", "full"], default="text",
                   help="3.25 in column, 5.5 in text width, 6.75 in full width")
    s.add_argument("--dpi", type=float, default=300, help="PNG resolution (default 300)")
    s.add_argument("--out", "-o", required=True, help="output directory")
    s.set_defaults(func=cmd_plot)
