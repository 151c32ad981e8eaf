"""``phasewatch claims [--quick] [--only N,...] [--out DIR]``: test the framework's claims.

Runs the experiments under ``examples/claims/`` (or ``--claims-dir``) and writes ``claims.md``,
``claims.json`` and a figure per claim."""

from __future__ import annotations

import argparse

from ..errors import PhasewatchError


def _parse_only(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PhasewatchError(f"--only {text}: give claim numbers separated by commas, e.g. --only 2,3") from None


def _cmd(a: argparse.Namespace) -> int:
    """Run ``phasewatch claims`` with the parsed arguments; return the exit status."""
    import matplotlib

    matplotlib.use("Agg")
    from ..workflows.claims import merge_previous, run_claims, write_table

    only = _parse_only(a.only)
    results = run_claims(a.out, quick=a.quick, only=only, directory=a.claims_dir)
    if only:  # --only updates those rows of an existing table of the same mode
        results = merge_previous(results, a.out, a.quick)
    md, js = write_table(results, a.out, quick=a.quick)
    rep = [(r.get("reproduction") or {}).get("verdict") or "not yet run" for r in results]
    rep_counts = {v: rep.count(v) for v in dict.fromkeys(rep)}
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("holds", "fails", "inconclusive")}
    print(f"wrote {md} and {js}: reproduction " + ", ".join(f"{n} {v}" for v, n in rep_counts.items())
          + "; beyond " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return 0


def register(sub) -> None:
    """Add ``phasewatch claims`` and its options to the CLI's subparsers."""
    s = sub.add_parser("claims", help="test the framework's claims (experiments under examples/claims)",
                       description=__doc__)
    s.add_argument("--quick", action="store_true", help="CI-sized experiments (one seed, small models)")
    s.add_argument("--only", metavar="N,...", help="run only these claims (numbers, comma-separated); the other "
                   "rows of an existing OUT/claims.json of the same mode are kept")
    s.add_argument("--out", default="claims-out", help="output directory (default claims-out)")
    s.add_argument("--claims-dir", metavar="DIR", help="the claim_NN_*.py experiments (default: examples/claims "
                   "of the source checkout, else of the current directory)")
    s.set_defaults(func=_cmd)
