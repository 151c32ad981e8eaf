"""The ``phasewatch`` command line: info, analyze, plot, pack, repair, demo.

Every error is one line on stderr and a non-zero exit status; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import PhasewatchError

log = logging.getLogger("phasewatch")

EXAMPLES = """
examples:
  phasewatch demo --out demo-out            train, record, analyse and plot the grokking demo
  phasewatch info data/grokking-p71         what a run holds
  phasewatch analyze data/grokking-p71 --window 10 --out out/
  phasewatch plot data/grokking-p71 --out out/ --format pdf png
  phasewatch pack runs/exp1 -o exp1.h5 --gzip 4
  phasewatch repair runs/exp1               after a crash: clean segments, keep committed rows
"""


def _add_window(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", "-w", type=int, default=10, help="Gram window W (default 10; at most K-1)")
    p.add_argument("--source", choices=["band", "snapshots"], default="band",
                   help="spectra from the per-step band (default) or from stored update snapshots")


def _formats(value: list[str]) -> list[str]:
    out = []
    for v in value:
        out += [x for x in v.replace(",", " ").split() if x]
    return out


def cmd_info(a: argparse.Namespace) -> int:
    from .store import open_run

    run = open_run(a.run)
    print(run.summary())
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from .analysis.pipeline import analyze

    null = a.null
    if null not in ("momentum", "none"):
        try:
            null = float(null)
        except ValueError:
            raise PhasewatchError(f"--null {a.null!r}: use momentum, none or a beta in [0, 1)") from None
    res = analyze(a.run, window=a.window, source=a.source, chunk_steps=a.chunk_steps, null=null)
    print(res.summary())
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in _formats(a.format):
            if f == "csv":
                print(f"wrote {res.to_csv(out / 'analysis.csv')}")
                if res.probes:
                    print(f"wrote {res.probes_to_csv(out / 'gradient_noise.csv')}")
            elif f == "json":
                print(f"wrote {res.to_json(out / 'analysis.json')}")
            else:
                raise PhasewatchError(f"--format {f}: use csv and/or json")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from .analysis.pipeline import analyze
    from .plot import FIGURES, MissingDataError, save

    names = list(FIGURES) if a.figure == "all" else [a.figure]
    for n in names:
        if n not in FIGURES:
            raise PhasewatchError(f"--figure {n}: unknown figure; choose from {', '.join(FIGURES)} or all")
    formats = _formats(a.format)
    for f in formats:
        if f not in ("pdf", "png", "svg"):
            raise PhasewatchError(f"--format {f}: use pdf, png or svg")
    if not 10 <= a.dpi <= 2400:
        raise PhasewatchError(f"--dpi {a.dpi:g}: use 10 to 2400 (PNG resolution; 300 for print)")
    res = analyze(a.run, window=a.window, source=a.source)
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
            for f in formats:
                path = out / f"{n}.{f}"
                save(fig, path, f, dpi=a.dpi)
                print(f"wrote {path}")
        finally:
            plt.close(fig)
    return 0


def cmd_pack(a: argparse.Namespace) -> int:
    from .store import pack_run

    dst = pack_run(a.run, a.output, gzip=a.gzip)
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_repair(a: argparse.Namespace) -> int:
    from .store import repair_run

    for line in repair_run(a.run):
        print(line)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    from .analysis.pipeline import analyze
    from .demo import train_grokking
    from .plot import FIGURES, save

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("grokking", a.weight_decay)]
    if a.control:
        runs.append(("control-no-wd", 0.0))
    for name, wd in runs:
        run_dir = out / name
        if run_dir.exists():
            if not a.overwrite:
                raise PhasewatchError(f"{run_dir}: exists; pass --overwrite or choose another --out")
            shutil.rmtree(run_dir)
        print(f"training the {name} run (p=71, width 2048, weight decay {wd:g}, {a.steps} steps) ...", flush=True)
        # gradient noise: 64 per-example gradients every 10 steps (C, p with intervals; ~10% of the time)
        r = train_grokking(run_dir, steps=a.steps, weight_decay=wd, seed=a.seed, progress=True,
                           grad_samples_every=10, grad_probe=64)
        grok = f"test accuracy >= 0.95 at step {r['grok_step']}" if r["grok_step"] else "never reached 0.95 test accuracy"
        print(f"  {r['n_params']:,} parameters, {r['seconds']:.1f} s; {grok}; final test accuracy "
              f"{r['final_test_acc']:.3f}")
        res = analyze(run_dir, window=a.window)
        print("\n".join("  " + line for line in res.summary().splitlines()))
        res.to_csv(out / f"{name}-analysis.csv")
        res.to_json(out / f"{name}-analysis.json")
        import matplotlib.pyplot as plt

        for kind in ("overview", "noise"):
            fig = FIGURES[kind](res)
            for f in ("pdf", "png"):
                save(fig, out / f"{name}-{kind}.{f}", f)
            plt.close(fig)
        print(f"  wrote {out / f'{name}-overview.pdf'} and {name}-noise.pdf (and .png), "
              f"{name}-analysis.csv/.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phasewatch",
        description="Record how a neural network learns, and analyse the recording.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"phasewatch {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show debug messages and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="what a run holds: model, optimizer, recorder, steps, segments")
    s.add_argument("run", help="run directory or packed .h5 file")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("analyze", help="spectra, k*, gap, A per window; summary; CSV/JSON export")
    s.add_argument("run")
    _add_window(s)
    s.add_argument("--out", "-o", help="directory for analysis.csv / analysis.json")
    s.add_argument("--chunk-steps", type=int, default=None, metavar="N",
                   help="stream the band N windows at a time (bounded memory; same result). Default: "
                        "streamed only when the band exceeds 1 GiB")
    s.add_argument("--format", nargs="+", default=["csv", "json"], help="csv and/or json (default both)")
    s.add_argument("--null", default="momentum", metavar="momentum|none|BETA",
                   help="momentum null of k* and the gap ratio: from the recorded optimizer (default), none "
                        "(beta = 0) or a heavy-ball beta")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("plot", help="figures (PDF/PNG/SVG) from a run")
    s.add_argument("run")
    _add_window(s)
    s.add_argument("--figure", default="all",
                   help="overview, noise, spectrum, hill, sharpness, ntk, criticality, or all (default; "
                        "skips figures whose data the run lacks)")
    s.add_argument("--format", nargs="+", default=["pdf", "png"], help="pdf, png, svg (default pdf png)")
    s.add_argument("--width", choices=["column", "text", "full"], default="text",
                   help="3.25 in column, 5.5 in text width, 6.75 in full width")
    s.add_argument("--dpi", type=float, default=300, help="PNG resolution (default 300)")
    s.add_argument("--out", "-o", required=True, help="output directory")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("pack", help="one self-contained .h5 file from a run directory")
    s.add_argument("run")
    s.add_argument("-o", "--output", required=True, help="output file")
    s.add_argument("--gzip", type=int, choices=range(1, 10), metavar="1-9", help="gzip level (optional)")
    s.set_defaults(func=cmd_pack)

    s = sub.add_parser("repair", help="after a crash: rewrite segments with their committed rows")
    s.add_argument("run")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("demo", help="train, record, analyse and plot the grokking demo (~1 min on CPU)")
    s.add_argument("--out", "-o", default="demo-out", help="output directory (default demo-out)")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--window", type=int, default=10)
    s.add_argument("--weight-decay", type=float, default=2e-4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--control", action="store_true", help="also train the weight-decay-0 control run")
    s.add_argument("--overwrite", action="store_true", help="replace existing runs in --out")
    s.set_defaults(func=cmd_demo)

    from .commands import register_all

    register_all(sub)
    return p


def main(argv: list[str] | None = None) -> int:
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
