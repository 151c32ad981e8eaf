"""``phasewatch export``: the analysis as TensorBoard event files, CSV, Parquet, an offline W&B run
or a local MLflow store.

``--follow`` keeps exporting while the run grows (TensorBoard, W&B or MLflow as a live dashboard)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import PhasewatchError
from .common import add_window

log = logging.getLogger("phasewatch")


def _check(a: argparse.Namespace) -> None:
    if not (a.tensorboard or a.csv or a.parquet or a.wandb is not None or a.mlflow):
        raise PhasewatchError("export: say where to: --tensorboard DIR, --csv DIR, --parquet DIR, --wandb DIR "
                              "and/or --mlflow DIR")
    if a.interval <= 0:
        raise PhasewatchError(f"--interval {a.interval:g}: must be positive seconds")
    if a.follow and a.source != "band":
        raise PhasewatchError("--follow works on the per-step band; drop --source snapshots")


def _add_sinks(a: argparse.Namespace, run, sinks: list) -> None:
    """Append the sinks the options ask for to ``sinks``.

    In place, so that the caller closes the sinks already made if a later one fails."""
    from ..outputs.export import CsvSink, ParquetSink, TensorBoardSink

    if a.tensorboard:
        sinks.append(TensorBoardSink(a.tensorboard, overwrite=a.overwrite))
    if a.csv:
        sinks.append(CsvSink(a.csv, overwrite=a.overwrite))
    if a.parquet:
        sinks.append(ParquetSink(a.parquet, overwrite=a.overwrite))
    name = a.run_name or Path(a.run).name
    if a.wandb is not None:
        from ..outputs.trackers import WandbSink

        config = {"phasewatch_run": str(a.run), "window": a.window, "model": run.meta.get("model", {}).get("class"),
                  "optimizer": run.meta.get("optimizer", {}).get("hyper"), "recorder": run.meta.get("recorder")}
        sinks.append(WandbSink(a.wandb_project, name, a.wandb or a.wandb_dir, config))
    if a.mlflow:
        from ..outputs.trackers import MlflowSink

        params = {"phasewatch_run": str(a.run), "window": a.window, "source": a.source,
                  **{k: v for k, v in run.meta.items() if k != "tables"}}
        sinks.append(MlflowSink(a.mlflow, name, params, experiment=a.mlflow_experiment))


def _follow(a: argparse.Namespace, f) -> None:
    print(f"following {a.run} every {a.interval:g} s (Ctrl-C stops)", flush=True)

    def report(fl, n: int) -> None:
        if n:
            print(f"step {fl.last_step}: +{n} rows", flush=True)

    try:
        why = f.follow(a.interval, idle_exit=a.idle_exit, on_poll=report)
    except KeyboardInterrupt:
        why = "stopped"
    print(f"{why}: exported {f.rows_written} rows in {f.polls} polls (last step {f.last_step})")


def cmd_export(a: argparse.Namespace) -> int:
    """Run ``phasewatch export`` with the parsed arguments; return the exit status."""
    from ..outputs.export import Follower
    from ..store import open_run

    _check(a)
    run = open_run(a.run)  # a clear error for a missing or foreign run before anything is created
    sinks: list = []
    try:
        _add_sinks(a, run, sinks)
        f = Follower(a.run, sinks, window=a.window, source=a.source)
        if a.follow:
            _follow(a, f)
        else:
            f.poll(run)
            print(f"exported {f.rows_written} rows (last step {f.last_step})")
        if a.figures:
            from ..outputs.trackers import log_figures

            log_figures(sinks, a.run, window=a.window, source=a.source)
    finally:
        for s in sinks:
            s.close()
    for s in sinks:
        where = getattr(s, "logdir", None) or getattr(s, "outdir", None)
        if where is not None:
            print(f"wrote {where}")
    return 0


def register(sub) -> None:
    """Add ``phasewatch export`` and its options to the CLI's subparsers."""
    s = sub.add_parser("export", help="analysis to TensorBoard / CSV / Parquet / W&B; --follow a live run",
                       description=__doc__)
    s.add_argument("run", help="run directory or packed .h5 file")
    add_window(s)  # the same --window/--source as analyze and plot
    s.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files into DIR")
    s.add_argument("--csv", metavar="DIR", help="one CSV per table (window, steps, noise, tail, curvature, eval, events)")
    s.add_argument("--parquet", metavar="DIR", help="one Parquet file per table (needs pyarrow)")
    s.add_argument("--wandb", nargs="?", const="", metavar="DIR",
                   help="an offline W&B run under DIR/wandb (default --wandb-dir; needs phasewatch[trackers]; "
                        "upload later with wandb sync)")
    s.add_argument("--wandb-project", default="phasewatch", help="W&B project (default phasewatch)")
    s.add_argument("--wandb-dir", default=".", help="where W&B keeps the offline run when --wandb has no DIR (default .)")
    s.add_argument("--mlflow", metavar="DIR", help="a run in the local MLflow store sqlite:///DIR/mlflow.db "
                   "(artifacts in DIR/artifacts; needs phasewatch[trackers])")
    s.add_argument("--mlflow-experiment", default="phasewatch", help="MLflow experiment (default phasewatch)")
    s.add_argument("--run-name", "--wandb-name", dest="run_name",
                   help="W&B / MLflow run name (default: the run directory's name)")
    s.add_argument("--figures", action="store_true",
                   help="W&B / MLflow: also the overview figure (PNG, drawn once at the end)")
    s.add_argument("--follow", action="store_true",
                   help="keep exporting as the run grows, until Ctrl-C or the run is closed")
    s.add_argument("--interval", type=float, default=10.0, help="seconds between polls with --follow (default 10)")
    s.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="with --follow: stop when nothing new arrived for this long (a crashed run never closes)")
    s.add_argument("--overwrite", action="store_true", help="replace earlier exports in the output directories")
    s.set_defaults(func=cmd_export)
