"""Experiment trackers as export sinks: an offline W&B run and a local MLflow store.

    phasewatch export RUN --wandb DIR --mlflow DIR [--figures] [--follow]

Both receive the rows of :func:`~phasewatch.outputs.export.tables` that the
:class:`~phasewatch.outputs.export.Follower` hands every sink (one poll, or each poll while
following), as the series of :func:`~phasewatch.outputs.export.scalar_series`: tag
``<table>/<column>``, x axis the optimizer step, finite values only.

W&B (:class:`WandbSink`): an offline run under ``DIR/wandb/offline-run-*`` (``WANDB_MODE=offline``
is set by the sink itself: no login, no network; ``wandb sync`` uploads it later), one ``log`` per
step with every tag of that step and the step itself as the metric ``step``, declared the x axis
of every series (``define_metric("*", step_metric="step")``).  W&B's own ``_step`` must increase, and
while following a table can arrive a poll after another (the writer flushes tables one by one), so
the optimizer step is not passed as ``_step``: a late row is a row of its own at its step, never
dropped.  After a resume over exported steps the resumed trajectory's rows follow (config
``phasewatch_resumed_at``), so both are there at the steps they share.

MLflow (:class:`MlflowSink`): a SQLite tracking store ``sqlite:///DIR/mlflow.db`` with artifacts
under ``DIR/artifacts`` (MLflow 3 keeps the plain-file store in maintenance mode and refuses it by
default, so the database backend is used; it is one file and needs no server).  Metrics per step,
timestamps the steps' wall clock; the run's metadata flattened into params (``model.class``,
``recorder.k`` …; keys and values cut to MLflow's limits); the conventions as ``conventions.json``
and the events as tags (``phasewatch.event.<kind>.<metric>.<step>``).  MLflow keeps every point it
was given (a point equal in key, step, value and timestamp once): after a resume over exported
steps the re-exported steps hold both trajectories' points, the later timestamps the kept one's.

Figures (``--figures``): the overview figure as a PNG (an MLflow artifact ``figures/overview.png``,
a W&B image ``figures/overview`` at the last step), drawn once from a full analysis at the end.

wandb and mlflow are imported only when a sink is made; without them a one-line error names
``pip install 'phasewatch[trackers]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError
from .rows import Sink, Table, merged_rows, scalar_series

log = logging.getLogger("phasewatch")

_EXTRA = "pip install 'phasewatch[trackers]'"
STEP = "step"  # W&B: the metric every series is drawn against (the optimizer step)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the duration of the block (restored after)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Loggers raised to WARNING for the duration of the block (trackers' INFO chatter)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as ``{"a.b.c": str(value)}``; lists and other values as JSON (or ``str``)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, str):
            out[key] = v
        else:
            try:
                out[key] = json.dumps(v, default=str)
            except (TypeError, ValueError):
                out[key] = str(v)
    return out


def overview_png(analysis, path: Path) -> Path | None:
    """The overview figure of ``analysis`` drawn to ``path`` (PNG); None (and a log line) if the
    analysis lacks its data."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plot import FIGURES, MissingDataError, save

    try:
        fig = FIGURES["overview"](analysis)
    except MissingDataError as e:
        log.warning("phasewatch: no overview figure: %s", str(e).splitlines()[0])
        return None
    try:
        save(fig, path, "png")
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
class WandbSink(Sink):
    """An offline W&B run in ``directory`` (see the module docstring)."""

    def __init__(self, project: str, name: str, directory: str | os.PathLike, config: dict) -> None:
        env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
               "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_DIR": str(directory)}
        with _env(**env):
            try:
                import wandb
            except ImportError:
                raise PhasewatchError(f"--wandb needs wandb: {_EXTRA} (or pip install wandb); the export is "
                                      "offline, upload it later with `wandb sync`") from None
            Path(directory).mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(mode="offline", silent=True, console="off", save_code=False,
                                      disable_git=True, x_disable_stats=True, x_disable_machine_info=True)
            self._run = wandb.init(project=project, name=name, dir=str(directory), config=config,
                                   settings=settings)
            # the optimizer step as every chart's x axis: a metric of its own, not W&B's ``_step``
            # (which must increase), so a table arriving a poll late or a resumed trajectory is kept
            self._run.define_metric(STEP)
            self._run.define_metric("*", step_metric=STEP)
        self._wandb = wandb
        self.outdir = Path(self._run.dir).parent  # DIR/wandb/offline-run-<time>-<id>
        self._last = -1
        self._resumed: list[int] = []

    def write(self, tabs: dict[str, Table], sigma, conventions) -> None:
        """One ``log({"step": step, **row})`` per step of the new rows, in increasing step order."""
        if conventions and "phasewatch_conventions" not in self._run.config:
            self._run.config.update({"phasewatch_conventions": dict(conventions)})
        for step, row in merged_rows(tabs):
            self._run.log({STEP: step, **row})
            self._last = max(self._last, step)

    def restart(self, step: int) -> None:
        """The run resumed at ``step`` (config ``phasewatch_resumed_at``): the resumed trajectory's
        rows follow, and W&B keeps both at the steps they share."""
        self._resumed.append(int(step))
        self._run.config.update({"phasewatch_resumed_at": list(self._resumed)}, allow_val_change=True)

    def log_figure(self, name: str, path: Path) -> None:
        """An image (``figures/<name>``) at the last logged step."""
        self._run.log({STEP: max(self._last, 0), f"figures/{name}": self._wandb.Image(str(path))})

    def close(self) -> None:
        """Finish the offline run (its transaction log is complete after this)."""
        if self._run is not None:
            self._run.finish()
            self._run = None


# ------------------------------------------------------------------------------------------------
class MlflowSink(Sink):
    """A run in a local MLflow store ``sqlite:///<directory>/mlflow.db`` (see the module docstring).

    ``params`` (the run's metadata) are flattened and cut to MLflow's key and value lengths."""

    def __init__(self, directory: str | os.PathLike, run_name: str, params: Mapping[str, Any] | None = None,
                 experiment: str = "phasewatch") -> None:
        with _env(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true"):
            try:
                import mlflow  # noqa: F401  (first: a missing top-level package, not a submodule, is the usual case)
                from mlflow.entities import Param, RunTag
                from mlflow.tracking import MlflowClient
                from mlflow.utils import validation as lim
            except ImportError as e:
                raise PhasewatchError(f"--mlflow needs mlflow ({e.name or 'mlflow'} is missing): {_EXTRA}") from None
        self.outdir = Path(directory).resolve()
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{self.outdir / 'mlflow.db'}"
        with _quiet("mlflow", "alembic"):
            self.client = MlflowClient(self.tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                experiment, artifact_location=(self.outdir / "artifacts").as_uri())
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self._lim = lim
        self._key_len = getattr(lim, "MAX_ENTITY_KEY_LENGTH", 250)
        items = [Param(self._key(k), v[: getattr(lim, "MAX_PARAM_VAL_LENGTH", 6000)])
                 for k, v in flatten(params or {}).items()]
        items = list({p.key: p for p in items}.values())  # keys cut to the same prefix: the last wins
        n = getattr(lim, "MAX_PARAMS_TAGS_PER_BATCH", 100)
        for i in range(0, len(items), n):
            self.client.log_batch(self.run_id, params=items[i: i + n])
        self._tag = RunTag
        self.wall_time = None  # set by the Follower: steps -> wall-clock seconds
        self._conventions = False
        self.n_metrics = 0

    def _key(self, k: str) -> str:
        k = "".join(c if c.isalnum() or c in "/_.- :" else "_" for c in str(k))
        return k[: self._key_len] or "_"

    def _timestamps(self, steps: np.ndarray) -> np.ndarray:
        import time

        now = time.time()
        w = np.full(len(steps), now) if self.wall_time is None else np.asarray(self.wall_time(steps), dtype=float)
        return np.round(np.where(np.isfinite(w) & (w > 0), w, now) * 1000).astype("i8")

    def write(self, tabs: dict[str, Table], sigma, conventions) -> None:
        """Every new point as a metric (key = tag, step, timestamp of the step); events as tags."""
        from mlflow.entities import Metric

        batch: list = []
        n = getattr(self._lim, "MAX_METRICS_PER_BATCH", 1000)
        for tag, st, v, _ in scalar_series(tabs):
            key = self._key(tag)
            for s, t, x in zip(st.tolist(), self._timestamps(st).tolist(), v.tolist()):
                batch.append(Metric(key, x, t, s))
                if len(batch) == n:
                    self.client.log_batch(self.run_id, metrics=batch)
                    self.n_metrics += len(batch)
                    batch = []
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            self.n_metrics += len(batch)
        if conventions and not self._conventions:
            self.client.log_dict(self.run_id, dict(conventions), "conventions.json")
            self._conventions = True
        tags = []
        if "events" in tabs:
            e = tabs["events"].columns
            for i in range(len(e["step"])):
                tags.append(self._tag(self._key(f"phasewatch.event.{e['kind'][i]}.{e['metric'][i]}.{int(e['step'][i])}"),
                                      f"step {int(e['step'][i])}: {float(e['value'][i]):.6g} ({e['rule'][i]})"))
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def restart(self, step: int) -> None:
        """A tag saying where the run resumed (MLflow keeps both points of a re-exported step)."""
        self.client.set_tag(self.run_id, "phasewatch.resumed_at_step", str(int(step)))

    def log_figure(self, name: str, path: Path) -> None:
        """``path`` as the artifact ``figures/<file name>``."""
        self.client.log_artifact(self.run_id, str(path), "figures")

    def close(self) -> None:
        """Mark the MLflow run finished."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


def log_figures(sinks: list[Sink], run, window: int = 10, source: str = "band",
                workdir: str | os.PathLike | None = None) -> Path | None:
    """Draw the overview figure of ``run`` once (a full analysis) and hand it to every sink that
    takes figures; returns the PNG's path when drawn into ``workdir`` (else it is drawn in a temporary
    folder and None is returned, as it is when no sink takes figures or the run lacks the data)."""
    takers = [s for s in sinks if hasattr(s, "log_figure")]
    if not takers:
        return None
    import tempfile

    from ..analysis.pipeline import analyze

    res = analyze(run, window=window, source=source)
    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        path = overview_png(res, folder / "overview.png")
        if path is not None:
            for s in takers:  # each copies the file into its own store
                s.log_figure("overview", path)
    return path if workdir is not None else None
