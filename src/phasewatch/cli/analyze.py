"""``phasewatch analyze RUN [--out DIR]``: the analysis summary, and its tables as CSV / JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PhasewatchError
from .common import add_window, formats


def cmd_analyze(a: argparse.Namespace) -> int:
    """Run ``phasewatch analyze`` with the parsed arguments; return the exit status."""
    from ..analysis.pipeline import analyze

    null = a.null
    if null not in ("momentum", "none", "off"):
        try:
            null = float(null)
        except ValueError:
            raise PhasewatchError(f"--null {a.null!r}: use momentum, none, off or a beta in [0, 1)") from None
    res = analyze(a.run, window=a.window, source=a.source, chunk_steps=a.chunk_steps, null=null,
                  layers=a.layers, rotation=not a.no_rotation)
    print(res.summary())
    if a.layers:
        from ..analysis.layers import layer_lines, layer_summary

        print("\n".join(layer_lines(layer_summary(res.layers))))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in formats(a.format):
            if f == "csv":
                print(f"wrote {res.to_csv(out / 'analysis.csv')}")
                if res.probes:
                    print(f"wrote {res.probes_to_csv(out / 'gradient_noise.csv')}")
                if res.layers:
                    print(f"wrote {res.layers_to_csv(out / 'analysis-layers.csv')}")
            elif f == "json":
                print(f"wrote {res.to_json(out / 'analysis.json')}")
            else:
                raise PhasewatchError(f"--format {f}: use csv and/or json")
    return 0


def register(sub) -> None:
    """Add ``phasewatch analyze`` and its options to the CLI's subparsers."""
    s = sub.add_parser("analyze", help="spectra, k*, gap, A per window; summary; CSV/JSON export")
    s.add_argument("run")
    add_window(s)
    s.add_argument("--out", "-o", help="directory for analysis.csv / analysis.json")
    s.add_argument("--chunk-steps", type=int, default=None, metavar="N",
                   help="stream the band N windows at a time (bounded memory; same result). Default: "
                        "streamed only when the band exceeds 1 GiB")
    s.add_argument("--layers", action="store_true",
                   help="also the per-window table of every layer group (analysis-layers.csv, a group column)")
    s.add_argument("--no-rotation", action="store_true",
                   help="skip the subspace-rotation column (two small eigensolves a window; NaN instead)")
    s.add_argument("--format", nargs="+", default=["csv", "json"], help="csv and/or json (default both)")
    s.add_argument("--null", default="momentum", metavar="momentum|none|off|BETA",
                   help="momentum null of k* and the gap ratio: from the recorded optimizer (default), none "
                        "(beta = 0), a heavy-ball beta, or off (no null: faster, nothing to judge k* against)")
    s.set_defaults(func=cmd_analyze)
