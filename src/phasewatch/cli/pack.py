"""``phasewatch pack RUN -o FILE``: one self-contained .h5 file from a run directory."""

from __future__ import annotations

import argparse


def cmd_pack(a: argparse.Namespace) -> int:
    """Run ``phasewatch pack`` with the parsed arguments; return the exit status."""
    from ..store import pack_run

    dst = pack_run(a.run, a.output, gzip=a.gzip)
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def register(sub) -> None:
    """Add ``phasewatch pack`` and its options to the CLI's subparsers."""
    s = sub.add_parser("pack", help="one self-contained .h5 file from a run directory")
    s.add_argument("run")
    s.add_argument("-o", "--output", required=True, help="output file")
    s.add_argument("--gzip", type=int, choices=range(1, 10), metavar="1-9", help="gzip level (optional)")
    s.set_defaults(func=cmd_pack)
