"""The ``phasewatch`` command line: the parser and :func:`main`.

Each command is a module of this package, listed in :data:`COMMANDS` (the order of ``phasewatch --help``).

Every error is one line on stderr and a non-zero exit status; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import PhasewatchError
from . import (
    analyze,
    claims,
    compare,
    curvature,
    demo,
    export,
    info,
    pack,
    plot,
    repair,
    report,
    study,
    watch,
)

log = logging.getLogger("phasewatch")

COMMANDS = (info, analyze, plot, pack, repair, demo, export, report, watch, curvature, study, compare, claims)

EXAMPLES = """
examples:
  phasewatch demo --out demo-out            train, record, analyse and plot the grokking demo
  phasewatch info data/grokking-p71         what a run holds
  phasewatch analyze data/grokking-p71 --window 10 --out out/
  phasewatch plot data/grokking-p71 --out out/ --format pdf png
  phasewatch pack runs/exp1 -o exp1.h5 --gzip 4
  phasewatch repair runs/exp1               after a crash: clean segments, keep committed rows
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``phasewatch`` parser with every command of :data:`COMMANDS`."""
    p = argparse.ArgumentParser(
        prog="phasewatch",
        description="Record how a neural network learns, and analyse the recording.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"phasewatch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show debug messages and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for mod in COMMANDS:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit status.

    A :class:`~phasewatch.errors.PhasewatchError` (and, without ``-v``, an ``OSError`` or
    ``ValueError``) is one line on stderr and status 1; Ctrl-C is status 130."""
    parser = build_parser()
    a = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if a.verbose else logging.INFO)
    log.propagate = False
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except PhasewatchError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"phasewatch: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phasewatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (OSError, ValueError) as e:
        if a.verbose:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"phasewatch: error: {type(e).__name__}: {first} (rerun with -v for details)", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
