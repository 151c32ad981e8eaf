"""Exports of an analysis: TensorBoard event files, CSV, Parquet (W&B and MLflow: :mod:`.trackers`);
following a live run.

    phasewatch export RUN --tensorboard tb/exp1 --csv out/ [--follow --interval 10]

:func:`tables` turns an :class:`~phasewatch.analysis.pipeline.Analysis` into flat, step-keyed
tables (one per kind of measurement), and every exporter writes those tables:

=========  ======================================================================================
window     per Gram window (keyed by the step it ends at): k*, gap ratio, gap, A, regime, σ_j, s_j …
steps      per optimizer step: loss, learning rate(s), gradient norm (global and per layer group),
           update norm, flags
noise      per gradient-sample measurement: C with CI, p with CI, C_naive, C_1, B_simple, n, b,
           phase, decision band, per-layer C
tail       rolling Hill α on gradient norms with its CI
curvature  per curvature probe (when the run has any): λ_max, S, trace, ρ, Φ, I …
eval       evaluation metrics, long form (step, name, value)
events     grokking step and jumps (step, kind, metric, value, rule)
=========  ======================================================================================

TensorBoard: every numeric column is a scalar series tagged ``<table>/<column>`` (``eval/<name>`` for
metrics); non-finite values are left out (TensorBoard cannot draw them); the singular values of
each window are also written as a histogram (``window/sigma`` and ``window/log10_sigma``) with one
bucket per distinct value, so the exact σ_j can be read back; events and the conventions are text.
Event files are written with TensorBoard's own writer and protocol buffers, so no torch and no
TensorFlow is needed.

Following (:class:`Follower`): the run is re-read every ``interval`` seconds and only rows newer
than those already exported are written; new segments (rotation, resume) are picked up as they
appear.  The analysis of each poll covers only the tail of the run that new rows need (the last
W+1 band rows before them, the last 100 gradient norms), so a poll costs the read of the run, not
a full re-analysis.  A resumed run that overlaps exported steps is handled as TensorBoard expects
from a restarted job: a ``SessionLog.START`` at the first overlapping step (TensorBoard drops the
older points after it) and the later rows are written again (CSV and Parquet files, which are only
appended to, then hold both; the later rows are the ones the reader keeps).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError, RunTooShortError
from .rows import (  # noqa: F401  (the tables and the Sink interface, re-exported)
    _HILL_WINDOW,
    TABLE_ORDER,
    Sink,
    Table,
    _conv_of,
    _numeric,
    _safe,
    _split2d,
    _strs,
    merged_rows,
    scalar_series,
    sigma_matrix,
    tables,
)

log = logging.getLogger("phasewatch")

def _check_dir(path: Path, patterns: tuple[str, ...], overwrite: bool, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    old = [p for pat in patterns for p in path.glob(pat)]
    if old and not overwrite:
        raise PhasewatchError(f"{path}: already holds {what} ({old[0].name}); pass --overwrite or "
                              "choose another directory")
    for p in old:
        p.unlink()


# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing needs it.  TensorBoard's
# own writer computes it in pure Python, byte by byte (~0.2 ms per KiB), which made event-file writing
# the bottleneck of an export.  CRC is linear over GF(2): the register after a block of m bytes is the
# XOR of per-position contributions _SHIFT[m-1-i][byte_i], with the incoming register folded into the
# block's first four bytes; one numpy gather and XOR-reduction per block of up to _CRC_BLOCK bytes.
_CRC_BLOCK = 1024
_CRC_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def _crc_tables() -> tuple[np.ndarray, np.ndarray]:
    global _CRC_TABLES
    if _CRC_TABLES is None:
        t = np.arange(256, dtype=np.uint32)
        for _ in range(8):
            t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
        shift = np.empty((_CRC_BLOCK, 256), dtype=np.uint32)
        shift[0] = t
        for k in range(1, _CRC_BLOCK):  # one more zero byte after each
            prev = shift[k - 1]
            shift[k] = (prev >> 8) ^ t[prev & 0xFF]
        _CRC_TABLES = (t, shift)
    return _CRC_TABLES


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (RFC 3720 §B.4; ``crc32c(b"123456789") == 0xE3069283``)."""
    table, shift = _crc_tables()
    a = np.frombuffer(bytes(data), dtype=np.uint8)
    reg = 0xFFFFFFFF
    for start in range(0, len(a), _CRC_BLOCK):
        blk = a[start: start + _CRC_BLOCK]
        m = len(blk)
        if m < 4:  # too short to fold the register in: byte by byte
            for byte in blk.tolist():
                reg = (reg >> 8) ^ int(table[(reg ^ byte) & 0xFF])
            continue
        blk = blk.copy()
        blk[:4] ^= np.frombuffer(reg.to_bytes(4, "little"), dtype=np.uint8)
        reg = int(np.bitwise_xor.reduce(shift[np.arange(m - 1, -1, -1), blk]))
    return reg ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC of TFRecord framing: rotate right by 15, add 0xA282EAD8 (mod 2^32)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_masked_crc_cached = functools.lru_cache(maxsize=4096)(masked_crc32c)  # record lengths repeat


class _EventFile:
    """A TensorBoard event file: TFRecords (length, masked CRC of the length, serialized ``Event``,
    masked CRC of it), starting with the ``brain.Event:2`` file-version event; written synchronously."""

    def __init__(self, logdir: Path, event_pb2) -> None:
        import socket

        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.phasewatch"
        self.path = Path(logdir) / name
        self._fh = open(self.path, "ab")
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add(self, event) -> None:
        import struct

        data = event.SerializeToString()
        head = struct.pack("<Q", len(data))
        self._fh.write(head + struct.pack("<I", _masked_crc_cached(head)) + data
                       + struct.pack("<I", masked_crc32c(data)))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


# columns left out of TensorBoard (they stay in CSV/Parquet): copies of per-step series, and the
# W per-mode stability coefficients
_TB_SKIP = {"window": ("lr", "update_norm", "stability_")}


def _tb_series(tabs: dict[str, Table]):
    for tag, st, v, desc in scalar_series(tabs):
        table, col = tag.split("/", 1)
        if any(col == x or (x.endswith("_") and col.startswith(x)) for x in _TB_SKIP.get(table, ())):
            continue
        yield tag, st, v, desc


class TensorBoardSink(Sink):
    """Event files in ``logdir``: TensorBoard's protocol buffers (legacy ``simple_value`` scalars and
    ``HistogramProto`` histograms, which every TensorBoard reads), one event per step.  Scalars are
    every numeric column except copies of per-step series and the per-mode stability coefficients
    (those are in the CSV/Parquet export)."""

    def __init__(self, logdir: str | os.PathLike, overwrite: bool = False, wall_time=None) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.plugins.histogram import metadata as histogram_metadata
            from tensorboard.plugins.scalar import metadata as scalar_metadata
            from tensorboard.plugins.text import summary_v2 as text_summary
        except ImportError:
            raise PhasewatchError("--tensorboard needs the tensorboard package: pip install "
                                  "'phasewatch[tensorboard]'") from None
        self.logdir = Path(logdir)
        _check_dir(self.logdir, ("events.out.tfevents.*",), overwrite, "TensorBoard event files")
        self._ev, self._sm, self._text = event_pb2, summary_pb2, text_summary
        self._plugins = {"scalar": scalar_metadata, "histo": histogram_metadata}
        self._file = _EventFile(self.logdir, event_pb2)
        self._described: set[str] = set()
        self.wall_time: Callable[[np.ndarray], np.ndarray] | None = wall_time
        self.n_scalars = 0

    def _walls(self, steps: np.ndarray) -> np.ndarray:
        now = time.time()
        if self.wall_time is None:
            return np.full(len(steps), now)
        w = np.asarray(self.wall_time(steps), dtype=float)
        return np.where(np.isfinite(w) & (w > 0), w, now)

    def _metadata(self, tag: str, kind: str, desc: str):
        """A series' metadata, sent with its first point only."""
        if tag in self._described:
            return None
        self._described.add(tag)
        return self._plugins[kind].create_summary_metadata(display_name=tag, description=desc)

    def write(self, tabs, sigma, conventions) -> None:
        by_step: dict[int, list] = {}
        for tag, st, v, desc in _tb_series(tabs):
            md = self._metadata(tag, "scalar", desc)
            for s, x in zip(st.tolist(), v.tolist()):
                by_step.setdefault(s, []).append((tag, x, md))
                md = None
            self.n_scalars += len(st)
        if sigma is not None and len(sigma[0]):
            for s, row in zip(sigma[0].tolist(), sigma[1]):
                row = row[np.isfinite(row) & (row > 0)]
                if row.size:
                    by_step.setdefault(s, []).extend([
                        ("window/sigma", self._histogram(row), self._metadata(
                            "window/sigma", "histo", "singular values of the update window (one bucket per value)")),
                        ("window/log10_sigma", self._histogram(np.log10(row)), self._metadata(
                            "window/log10_sigma", "histo", "log10 of the window's singular values"))])
        if "events" in tabs:
            e = tabs["events"].columns
            for i in range(len(e["step"])):
                text = (f"{e['kind'][i]} at step {int(e['step'][i])}: {e['metric'][i]} = {e['value'][i]:.4g} "
                        f"({e['rule'][i]})")
                by_step.setdefault(int(e["step"][i]), []).append(self._text.text_pb("events", text).value[0])
        if "interventions" in tabs:
            c = tabs["interventions"].columns
            for i in range(len(c["step"])):
                text = (f"{c['rule'][i]}: {c['param'][i]} {float(c['old'][i]):.6g} -> {float(c['new'][i]):.6g}"
                        + (f" ({c['note'][i]})" if "note" in c and str(c["note"][i]) else ""))
                by_step.setdefault(int(c["step"][i]), []).append(self._text.text_pb("interventions", text).value[0])
        if conventions and "conventions" not in self._described:
            self._described.add("conventions")
            md = "\n".join(f"* **{k}**: {v}" for k, v in conventions.items())
            by_step.setdefault(0, []).append(self._text.text_pb("conventions", md).value[0])
        steps = np.array(sorted(by_step), dtype="i8")
        for s, w in zip(steps.tolist(), self._walls(steps).tolist()):
            ev = self._ev.Event(wall_time=w, step=s)
            values = ev.summary.value
            for item in by_step[s]:
                if not isinstance(item, tuple):
                    values.append(item)
                    continue
                tag, x, md = item
                v = values.add(tag=tag, simple_value=x) if isinstance(x, float) else values.add(tag=tag, histo=x)
                if md is not None:
                    v.metadata.CopyFrom(md)
            self._file.add(ev)
        self._file.flush()

    def _histogram(self, x: np.ndarray):
        """Exact histogram: one bucket per distinct value, its right edge the value itself."""
        xs = sorted(np.asarray(x, dtype=float).tolist())  # W values: plain Python is fastest
        limits, counts = [xs[0]], [1.0]
        for v in xs[1:]:
            if v == limits[-1]:
                counts[-1] += 1.0
            else:
                limits.append(v)
                counts.append(1.0)
        return self._sm.HistogramProto(min=xs[0], max=xs[-1], num=float(len(xs)), sum=math.fsum(xs),
                                       sum_squares=math.fsum(v * v for v in xs), bucket_limit=limits,
                                       bucket=counts)

    def restart(self, step: int) -> None:
        e = self._ev.Event(wall_time=time.time(), step=int(step))
        e.session_log.status = self._ev.SessionLog.START
        self._file.add(e)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _csv_cell(x) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        return x.decode()
    if isinstance(x, (str, np.str_)):
        return str(x)
    if isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "" if math.isnan(x) else repr(x)


class CsvSink(Sink):
    """One CSV per table (``<table>.csv``, header row, empty cell = missing) and ``conventions.json``
    (which definition each column uses); rows are appended, so a followed run's CSVs grow as it does.
    Numbers are written with ``repr`` (they read back exactly)."""

    def __init__(self, outdir: str | os.PathLike, overwrite: bool = False) -> None:
        self.outdir = Path(outdir)
        _check_dir(self.outdir, (*(f"{t}.csv" for t in TABLE_ORDER), "conventions.json"), overwrite,
                   "exported CSV files")
        self._headers: dict[str, list[str]] = {}
        self.paths: dict[str, Path] = {}

    def write(self, tabs, sigma, conventions) -> None:
        conv = self.outdir / "conventions.json"
        if conventions and not conv.exists():  # which definition each column uses
            conv.write_text(json.dumps(conventions, indent=1) + "\n")
        for name, t in tabs.items():
            if not len(t):
                continue
            names = list(t.columns)
            path = self.outdir / f"{name}.csv"
            new = name not in self._headers
            if not new and names != self._headers[name]:
                raise PhasewatchError(f"{path}: the {name} table's columns changed while following "
                                      f"({len(self._headers[name])} -> {len(names)}); export again into a new directory")
            with open(path, "w" if new else "a", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                if new:
                    w.writerow(names)
                    self._headers[name] = names
                    self.paths[name] = path
                cols = [t.columns[n] for n in names]
                for i in range(len(t)):
                    w.writerow([_csv_cell(c[i]) for c in cols])


class ParquetSink(Sink):
    """One Parquet file per table (``<table>.parquet``, pyarrow).  When following, each poll adds a
    row group and the files are complete (readable) once following stops."""

    def __init__(self, outdir: str | os.PathLike, overwrite: bool = False) -> None:
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise PhasewatchError("--parquet needs pyarrow: pip install pyarrow") from None
        self.outdir = Path(outdir)
        _check_dir(self.outdir, tuple(f"{t}.parquet" for t in TABLE_ORDER), overwrite, "exported Parquet files")
        self._writers: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}

    def write(self, tabs, sigma, conventions) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for name, t in tabs.items():
            if not len(t):
                continue
            arrays = {}
            for k, v in t.columns.items():
                v = np.asarray(v)
                arrays[k] = pa.array(v.tolist(), type=pa.string()) if v.dtype.kind in "OSU" else pa.array(v)
            table = pa.table(arrays)
            if name not in self._writers:
                md = {b"phasewatch.table": name.encode()}
                md.update({f"phasewatch.convention.{k}".encode(): v.encode() for k, v in conventions.items()})
                schema = table.schema.with_metadata(md)
                self.paths[name] = self.outdir / f"{name}.parquet"
                self._writers[name] = pq.ParquetWriter(self.paths[name], schema)
            w = self._writers[name]
            if table.schema.names != w.schema.names:
                raise PhasewatchError(f"{self.paths[name]}: the {name} table's columns changed while "
                                      "following; export again into a new directory")
            w.write_table(table.cast(w.schema))

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


# ------------------------------------------------------------------------------------------------
# analysing the new tail of a run
class _TailColumns(Mapping):
    """Rows from ``cut`` on of a lazy run's table (:class:`~phasewatch.store.reader.LazyTable`):
    a column is read (its tail only) on first access."""

    def __init__(self, table, cut: int) -> None:
        self._t, self._cut, self._cache = table, int(cut), {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._t.rows(self._cut, self._t.n_rows, (name,))[name]
        return self._cache[name]

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


class _TailRun:
    """A :class:`~phasewatch.store.Run` whose ``band`` and ``steps`` tables start at given rows;
    everything else is the run itself.  ``analyze`` of it gives, for every window and rolling-Hill
    window that lies wholly inside the kept rows, exactly the values of the full analysis."""

    def __init__(self, run, band_from: int, steps_from: int) -> None:
        self._run = run
        self._cut = {"band": int(band_from), "steps": int(steps_from)}

    def table(self, name: str, steps=None):
        t = self._run.table(name) if steps is None else self._run.table(name, steps)
        cut = self._cut.get(name, 0)
        if not cut:
            return t
        if hasattr(t, "rows"):  # a lazy run: read each column's tail when asked, never whole
            return _TailColumns(t, cut)
        return {k: v[cut:] for k, v in t.items()}

    @property
    def band(self):
        return self.table("band")

    @property
    def steps(self):
        return self.table("steps")

    def __getattr__(self, name: str):
        return getattr(self._run, name)


def analyze_tail(run, window: int = 10, *, after: dict[str, int] | None = None, source: str = "band"):
    """``phasewatch.analyze(run)`` restricted to what rows after ``after`` need.

    ``after`` maps ``window``, ``steps`` and ``tail`` to the last step already exported (missing:
    nothing exported).  Band rows from W+1 before the first new window and gradient norms from 100
    before the first new step are kept, so the new rows of the result equal the full analysis'.
    A run still shorter than the window gives an analysis without windows (steps, metrics, noise).
    """
    from ..analysis.pipeline import Analysis, analyze, noise_table

    after = after or {}
    src = run
    if source == "band":
        bst = np.asarray(run.band["step"])
        sst = np.asarray(run.steps["step"])
        first_w = int(np.searchsorted(bst, after.get("window", np.iinfo("i8").min), side="right"))
        first_s = int(np.searchsorted(sst, min(after.get("steps", np.iinfo("i8").min),
                                               after.get("tail", np.iinfo("i8").min)), side="right"))
        band_from = max(0, min(first_w, len(bst)) - window - 1)
        steps_from = max(0, min(first_s, len(sst)) - _HILL_WINDOW)
        if band_from or steps_from:
            src = _TailRun(run, band_from, steps_from)
    try:
        return analyze(src, window=window, source=source)
    except RunTooShortError:
        probes = {}
        if "grad_samples" in run.meta.get("tables", {}):
            gs = run.table("grad_samples")
            if len(gs["step"]):
                probes = noise_table(gs)
        return Analysis(source=source, window=window, n_params=run.n_params, table={}, scalars=run.steps,
                        metrics=run.metrics(), probes=probes)


# ------------------------------------------------------------------------------------------------
# one-shot export and following
class Follower:
    """Export a run to sinks, then (``poll`` again) only what is new.

    ``done`` holds, per series, the last exported step: ``window``, ``steps``, ``noise``, ``tail``,
    ``curvature``, ``eval/<name>`` and the events written.
    """

    def __init__(self, run_path: str | os.PathLike, sinks: list[Sink], window: int = 10, source: str = "band"):
        self.path = Path(run_path)
        self.sinks = sinks
        self.window = int(window)
        self.source = source
        self.done: dict[str, int] = {}
        self._events: set[tuple[str, str, int]] = set()
        self._segments: dict[str, int | None] = {}
        self.polls = 0
        self.rows_written = 0
        self.last_step: int | None = None
        self.run = None

    def _wall(self, run):
        st = np.asarray(run.steps["step"])
        wt = np.asarray(run.steps.get("wall_time", np.full(len(st), np.nan)), dtype=float)

        def lookup(steps: np.ndarray) -> np.ndarray:
            if not len(st):
                return np.full(len(steps), np.nan)
            i = np.clip(np.searchsorted(st, steps), 0, len(st) - 1)
            return np.where(st[i] == steps, wt[i], np.nan)

        return lookup

    def _check_restart(self, run) -> None:
        """A segment not seen before that starts at or before an exported step: the run resumed from
        an earlier checkpoint; everything from that step is exported again."""
        exported = max(self.done.values(), default=None)
        restart = None
        for s in run.segments:
            if s.label not in self._segments and s.first_step is not None and exported is not None \
                    and s.first_step <= exported:
                restart = s.first_step if restart is None else min(restart, s.first_step)
            if s.first_step is not None:
                self._segments[s.label] = s.first_step
        if restart is not None:
            log.info("phasewatch: the run resumed at step %d over exported steps; re-exporting from there", restart)
            for sink in self.sinks:
                sink.restart(restart)
            self.done = {k: min(v, restart - 1) for k, v in self.done.items()}
            self._events = {e for e in self._events if e[2] < restart}

    def poll(self, run=None) -> int:
        """Read the run (or take ``run``, already opened), export rows not exported before; return how
        many rows were written."""
        from ..store import open_run

        run = open_run(self.path) if run is None else run
        self.run = run
        self._check_restart(run)
        res = analyze_tail(run, self.window, after=self.done, source=self.source)
        tabs = tables(res, run.layer_names)
        new: dict[str, Table] = {}
        n = 0
        for name, t in tabs.items():
            st = np.asarray(t.columns["step"], dtype="i8")
            if name == "eval":
                names = t.columns["name"]
                keep = np.zeros(len(st), dtype=bool)
                for m in dict.fromkeys(names.tolist()):
                    sel = names == m
                    keep |= sel & (st > self.done.get(f"eval/{m}", np.iinfo("i8").min))
                    if sel.any():
                        self.done[f"eval/{m}"] = int(st[sel].max())
            elif name == "events":
                keys = list(zip(t.columns["kind"].tolist(), t.columns["metric"].tolist(), st.tolist()))
                keep = np.array([k not in self._events for k in keys], dtype=bool)
                self._events.update(keys)
            else:
                keep = st > self.done.get(name, np.iinfo("i8").min)
                if len(st):
                    self.done[name] = max(self.done.get(name, int(st.max())), int(st.max()))
            if keep.any():
                new[name] = t.select(keep)
                n += int(keep.sum())
        sigma = None
        if "window" in new:
            keep = np.isin(np.asarray(res.table["step"]), new["window"].columns["step"])
            sigma = (np.asarray(res.table["step"])[keep], sigma_matrix(res)[keep])
        for sink in self.sinks:
            if hasattr(sink, "wall_time"):  # TensorBoard, MLflow: points stamped with the step's time
                sink.wall_time = self._wall(run)
            if new or not self.polls:
                sink.write(new, sigma, res.conventions)
        self.polls += 1
        self.rows_written += n
        st = run.steps["step"]
        self.last_step = int(st[-1]) if len(st) else self.last_step
        return n

    def follow(self, interval: float = 10.0, *, stop: Callable[[], bool] | None = None,
               idle_exit: float | None = None, on_poll: Callable[[Follower, int], None] | None = None) -> str:
        """Poll every ``interval`` seconds until ``stop()`` is true, the run is closed (checked on
        two consecutive polls, after a final poll), or nothing new arrived for ``idle_exit`` seconds.
        Returns why it stopped: ``"stopped"``, ``"closed"`` or ``"idle"``."""
        from ..store.live import run_closed

        last_new = time.monotonic()
        closed_before = False
        while True:
            closed_now = run_closed(self.path, self.run.meta if self.run is not None else None)
            n = self.poll()
            if on_poll is not None:
                on_poll(self, n)
            if n:
                last_new = time.monotonic()
            if closed_now and closed_before:
                return "closed"
            closed_before = closed_now
            if idle_exit is not None and time.monotonic() - last_new >= idle_exit:
                return "idle"
            deadline = time.monotonic() + (0.0 if closed_now else interval)
            while True:
                if stop is not None and stop():
                    self.poll()
                    return "stopped"
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.05))

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def export(run, *, tensorboard: str | os.PathLike | None = None, csv_dir: str | os.PathLike | None = None,
           parquet: str | os.PathLike | None = None, wandb: str | os.PathLike | None = None,
           mlflow: str | os.PathLike | None = None, window: int = 10, source: str = "band",
           overwrite: bool = False) -> Follower:
    """One-shot export of a run (a path or an opened :class:`~phasewatch.store.Run`) to the given
    destinations (``wandb``, ``mlflow``: directories, see :mod:`.trackers`); returns the (closed)
    exporter, whose ``rows_written`` says how much was written."""
    sinks: list[Sink] = []
    try:
        if tensorboard is not None:
            sinks.append(TensorBoardSink(tensorboard, overwrite=overwrite))
        if csv_dir is not None:
            sinks.append(CsvSink(csv_dir, overwrite=overwrite))
        if parquet is not None:
            sinks.append(ParquetSink(parquet, overwrite=overwrite))
        if wandb is not None or mlflow is not None:
            from . import trackers

            name = Path(getattr(run, "path", run)).name
            if wandb is not None:
                sinks.append(trackers.WandbSink("phasewatch", name, wandb, {"window": window}))
            if mlflow is not None:
                sinks.append(trackers.MlflowSink(mlflow, name, {"window": window, "source": source}))
        f = Follower(getattr(run, "path", run), sinks, window=window, source=source)
        f.poll(run if hasattr(run, "table") else None)
    finally:
        for s in sinks:
            s.close()
    return f
