"""Reading a run: a run directory or a packed file, complete, crashed or still being written.

The reader trusts each table's ``committed_rows`` (and trims to the shortest column), reads
segments in order, reports a segment it cannot open and goes on, refuses external links and
virtual datasets, and reports (never silently merges) steps that overlap or leave a gap between
segments.  Where a resumed segment overlaps an earlier one, the later rows win: they are the
trajectory training actually continued on.

Hostile or damaged files (issue 8, ``tests/fault``): before anything is read, declared sizes are
checked against the bytes the file stores (a count or a shape the file cannot hold is refused, no
memory is allocated for it), as are dtypes, filters, the table declarations of the metadata and
hard-link cycles; a file's HDF5 metadata is first walked in a helper process with a time limit,
because some corruptions make HDF5 loop forever (see :func:`_guard_files`).  In a run directory a
damaged segment is skipped with a one-line warning; a single file (packed run, or one segment) is
a one-line :class:`RunFormatError`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import RunFormatError, SchemaVersionError
from . import format as fmt
from . import guard
from .guard import _guard_files
from .lazy import _ROW, LazyTable
from .segments import (
    _MAX_META_BYTES,
    _READ_ERRORS,
    _check_safe,
    _check_table_spec,
    _FileSegment,
    _first_line,
    _is_hdf5,
    _open_h5,
    _PackedSegment,
    _read_meta_json,
    _unreadable,
    _UnsafeContentError,
    check_schema,
    read_table,
)
from .writer import writer_is_live

log = logging.getLogger("phasewatch")

# Tables whose rows are keyed by training step and cut where a resumed segment starts.
_STEP_TABLES = ("steps", "band", "metrics", "snapshots", "checkpoints", "grad_samples", "interventions",
                "curvature", "ntk", "grad_proj")
# Tables with wide rows: only their ``step`` column is read up front, the rest on first access.
HEAVY_TABLES = ("snapshots", "checkpoints", "grad_proj")
# Per-step tables that a *lazy* run (:func:`open_run` ``lazy=``) reads column by column, on access
# and by row range (:class:`LazyTable`), instead of at open.
LAZY_TABLES = ("steps", "band")
# A run whose files hold more than this many bytes is opened lazily unless ``lazy=`` says otherwise
# (environment: ``PHASEWATCH_LAZY_ABOVE``, bytes).
LAZY_ABOVE = 256 << 20


def _lazy_above() -> int:
    try:
        return int(float(os.environ.get("PHASEWATCH_LAZY_ABOVE", LAZY_ABOVE)))
    except ValueError:
        return LAZY_ABOVE


@dataclass
class SegmentInfo:
    """What the reader found in one segment: rows per table, the step range, or the error that kept it out."""

    label: str
    index: int
    rows: dict[str, int] = field(default_factory=dict)
    first_step: int | None = None
    last_step: int | None = None
    error: str | None = None


class Run:
    """A recorded run, read-only.  Use :func:`open_run`.

    Attributes
    ----------
    meta: the run's metadata (model, optimizer, recorder configuration, versions, seeds).
    segments: one :class:`SegmentInfo` per segment, including ones that could not be read.
    warnings: one-line messages about skipped segments, overlaps and gaps.
    lazy: whether the per-step tables (``steps``, ``band``) are read on access (:class:`LazyTable`)
        rather than at open.
    """

    def __init__(self, path: Path, meta: dict, sources: list[tuple[str, int, object]], packed: bool,
                 single_file: bool = False, refused: dict[str, str] | None = None, lazy: bool | None = None):
        self.path = path
        if lazy is None:
            files = {getattr(op, "path", None) for _, _, op in sources}
            size = 0
            for f in files:
                try:
                    size += os.path.getsize(f) if f is not None else 0
                except OSError:
                    pass
            lazy = size > _lazy_above()
        self.lazy = bool(lazy)
        self._unguarded = False  # set when unpickled in another process: walk the files before reading
        self.meta = meta
        self.packed = packed
        self._single_file = single_file  # a damaged segment is an error, not a warning
        self._refused = refused or {}  # label -> why the metadata guard refused the segment
        self._sources = sources
        _check_table_spec(meta, str(path))
        self.warnings: list[str] = []
        self.segments: list[SegmentInfo] = []
        self._tables: dict[str, dict[str, np.ndarray]] = {}
        self._openers: dict[str, object] = {}
        self._heavy_rows: dict[str, list[tuple[str, np.ndarray]]] = {}
        self._load()

    # -- loading ----------------------------------------------------------------------------
    def _load(self) -> None:
        spec = self.meta.get("tables", {})
        per_segment: list[tuple[SegmentInfo, dict[str, dict[str, np.ndarray]]]] = []
        lazy_cols: dict[str, list[str]] = {}
        for label, index, opener in self._sources:
            info = SegmentInfo(label=label, index=index)
            if label in self._refused:
                info.error = self._refused[label]
                self.warnings.append(f"skipped {label}: {self._refused[label]}")
                self.segments.append(info)
                continue
            try:
                with opener() as (group, where):
                    check_schema(group.attrs, where) if "format" in group.attrs else None
                    _check_safe(group, where)
                    tables = {}
                    for tname in group:
                        if isinstance(group[tname], h5py.Group):
                            lazy_t = self.lazy and tname in LAZY_TABLES
                            only = ("step",) if tname in HEAVY_TABLES or lazy_t else None
                            tables[tname] = read_table(
                                group[tname], spec.get(tname), f"{where}:{tname}", only
                            )
                            info.rows[tname] = len(next(iter(tables[tname].values()), []))
                            if lazy_t:  # remember each kept row's index in its segment
                                tables[tname][_ROW] = np.arange(info.rows[tname], dtype=np.int64)
                                cols = spec.get(tname) or {}
                                names = [c for c in cols if c in group[tname]]
                                names += [c for c in group[tname] if c not in cols and c != fmt.COMMITTED]
                                lazy_cols.setdefault(tname, names)
            except RunFormatError as e:
                if isinstance(e, (SchemaVersionError, _UnsafeContentError)) or self._single_file:
                    raise
                info.error = str(e)
                self.warnings.append(f"skipped {label}: {e}")
                self.segments.append(info)
                continue
            except _READ_ERRORS as e:
                first = _first_line(e)
                if self._single_file:
                    raise RunFormatError(f"{self.path}: damaged file ({type(e).__name__}: {first}); "
                                         "use an intact copy") from None
                info.error = f"{label}: cannot open ({first})"
                self.warnings.append(
                    f"skipped {label}: unreadable ({first}); a segment truncated by a crash or "
                    "copied while written; `phasewatch repair` sets it aside"
                )
                self.segments.append(info)
                continue
            steps = tables.get("steps", {}).get("step")
            if steps is not None and len(steps):
                info.first_step, info.last_step = int(steps[0]), int(steps[-1])
                if np.any(np.diff(steps) <= 0):
                    self.warnings.append(f"{label}: steps do not increase within the segment")
            self.segments.append(info)
            per_segment.append((info, tables))
            self._openers[info.label] = opener

        # Continuity: later segments win where they overlap earlier ones.  Where a resumed
        # session starts, rows of earlier sessions at or after its first step are dropped even
        # when the steps tables do not overlap: they belong to the interrupted trajectory (a
        # crash can leave rows of other tables, e.g. the band, committed ahead of their steps row).
        sessions = self.meta.get("sessions")
        resumed_at = {
            s.get("first_segment") for s in (sessions if isinstance(sessions, list) else [])
            if isinstance(s, dict) and s.get("resumed")
        }
        prev_last = None
        for i, (info, _) in enumerate(per_segment):
            if info.first_step is None:
                continue
            overlap = prev_last is not None and info.first_step <= prev_last
            if overlap or (i and info.index in resumed_at):
                for _, earlier in per_segment[:i]:
                    for tname in _STEP_TABLES:
                        t = earlier.get(tname)
                        if t and "step" in t:
                            keep = t["step"] < info.first_step
                            if not keep.all():
                                for c in t:
                                    t[c] = t[c][keep]
            if prev_last is not None:
                if overlap:
                    self.warnings.append(
                        f"{info.label} starts at step {info.first_step} but earlier segments reach "
                        f"step {prev_last}: overlap of {prev_last - info.first_step + 1} steps "
                        "(resumed from an earlier checkpoint); keeping the later rows"
                    )
                elif info.first_step > prev_last + 1:
                    self.warnings.append(
                        f"{info.label} starts at step {info.first_step} after step {prev_last}: "
                        f"{info.first_step - prev_last - 1} steps are not recorded"
                    )
            prev_last = info.last_step if prev_last is None else max(prev_last, info.last_step)

        for tname in HEAVY_TABLES:
            self._heavy_rows[tname] = [
                (info.label, tables[tname]["step"]) for info, tables in per_segment if tname in tables
            ]
        names = {t for _, tables in per_segment for t in tables if t not in HEAVY_TABLES}
        for tname in names:
            if tname in lazy_cols:
                self._tables[tname] = LazyTable(self, tname, lazy_cols[tname], [
                    (info.label, tables[tname]) for info, tables in per_segment if tname in tables])
                continue
            parts = [tables[tname] for _, tables in per_segment if tname in tables]
            cols = parts[0].keys()
            self._tables[tname] = {
                c: np.concatenate([p[c] for p in parts if c in p]) for c in cols
            }
        for w in self.warnings:
            log.warning("%s", w)

    def __setstate__(self, state: dict) -> None:
        # a Run sent to another process (e.g. inside an Analysis from a worker) reads its files
        # there: they are walked by this process' metadata guard before the first read
        self.__dict__.update(state)
        self._unguarded = True

    def _guard(self) -> None:
        if not self._unguarded:
            return
        files = list(dict.fromkeys(Path(op.path) for op in self._openers.values()))
        for f, problem in _guard_files(files).items():
            if problem:
                raise RunFormatError(f"{f}: {problem}")
        self._unguarded = False

    # -- access -----------------------------------------------------------------------------
    def table(self, name: str, steps=None) -> dict[str, np.ndarray]:
        """Columns of a table as arrays (empty arrays if the run has no such rows).

        Wide tables (snapshots, checkpoints) are read on first access; pass ``steps`` to read
        only the rows of those steps.  In a lazy run (:attr:`lazy`) the per-step tables are
        :class:`LazyTable` mappings: a column is read when first asked for, and
        :meth:`LazyTable.rows` reads a range of rows without reading the whole column.
        """
        if name in HEAVY_TABLES and name in self._heavy_rows and self._heavy_rows[name]:
            return self._read_heavy(name, steps)
        if name in self._tables:
            return self._tables[name]
        cols = self.meta.get("tables", {}).get(name)
        if cols is None:
            raise KeyError(f"{self.path}: no table {name!r} in this run")
        return {c: np.empty((0, *shape), dtype=dt) for c, (dt, shape) in cols.items()}

    def heavy_steps(self, name: str) -> np.ndarray:
        """The steps at which a wide table (snapshots, checkpoints) has rows, without reading them."""
        parts = [st for _, st in self._heavy_rows.get(name, [])]
        return np.concatenate(parts) if parts else np.empty(0, dtype="i8")

    def _read_heavy(self, name: str, steps=None) -> dict[str, np.ndarray]:
        want = None if steps is None else np.asarray(steps, dtype="i8")
        parts = []
        spec = self.meta.get("tables", {}).get(name)
        for label, kept in self._heavy_rows[name]:
            try:
                with self._openers[label]() as (group, where):
                    # read the wide columns of the wanted rows only, not the whole table
                    st = read_table(group[name], spec, f"{where}:{name}", only=("step",))["step"]
                    sel = np.isin(st, kept)
                    if want is not None:
                        sel &= np.isin(st, want)
                    parts.append(read_table(group[name], spec, f"{where}:{name}", rows=np.flatnonzero(sel)))
            except RunFormatError:
                raise
            except _READ_ERRORS as e:
                raise _unreadable(label, name, e) from None
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    @property
    def steps(self) -> dict[str, np.ndarray]:
        return self.table("steps")

    @property
    def band(self) -> dict[str, np.ndarray]:
        return self.table("band")

    def metrics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Evaluation metrics as ``{name: (steps, values)}``, sorted by step."""
        t = self.table("metrics") if "metrics" in self._tables else None
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if not t or not len(t["step"]):
            return out
        names = np.array([n.decode() if isinstance(n, bytes) else str(n) for n in t["name"]])
        for name in dict.fromkeys(names):
            sel = names == name
            order = np.argsort(t["step"][sel], kind="stable")
            out[name] = (t["step"][sel][order], t["value"][sel][order])
        return out

    @property
    def layer_names(self) -> list[str]:
        return [g["name"] for g in self.meta.get("model", {}).get("groups", [])]

    @property
    def n_params(self) -> int:
        return int(self.meta.get("model", {}).get("n_params", 0))

    def summary(self) -> str:
        """A few lines for ``phasewatch info``."""
        m = self.meta
        model = m.get("model", {})
        rec = m.get("recorder", {})
        steps = self.steps["step"]
        lines = [
            f"run        {self.path}{' (packed)' if self.packed else ''}",
            f"schema     {m.get('format')} v{m.get('schema_version')}  phasewatch {m.get('versions', {}).get('phasewatch', '?')}"
            f"  torch {m.get('versions', {}).get('torch', '?')}",
            f"model      {model.get('class', '?')}: {model.get('n_params', 0):,} parameters in "
            f"{len(model.get('groups', []))} layer groups",
            f"optimizer  {m.get('optimizer', {}).get('class', '?')} {m.get('optimizer', {}).get('hyper', {})}",
            f"recorder   K={rec.get('k')} stride={rec.get('stride')} mode={rec.get('mode')}"
            + (f" (d={rec.get('proj_dim')} per layer, seed {rec.get('proj_seed')})" if rec.get("mode") == "projected" else ""),
            f"steps      {len(steps):,} rows" + (f", steps {int(steps[0])}..{int(steps[-1])}" if len(steps) else ""),
            f"band rows  {len(self.band['step']):,}",
        ]
        mets = self.metrics()
        if mets:
            lines.append("metrics    " + ", ".join(f"{k} ({len(v[0])})" for k, v in mets.items()))
        for name in HEAVY_TABLES:
            n = len(self.heavy_steps(name))
            if n:
                lines.append(f"{name:<10} {n} rows")
        flags = self.steps.get("flags")
        if flags is not None and np.any(flags):
            lines.append(f"flags      {int(np.count_nonzero(flags))} steps with non-finite loss/gradient/update")
        lines.append(f"segments   {len(self.segments)}" + "".join(
            f"\n  {s.label}: " + (s.error or ", ".join(f"{k}={v}" for k, v in s.rows.items()))
            for s in self.segments))
        for w in self.warnings:
            lines.append(f"warning    {w}")
        return "\n".join(lines)


def open_run(path: str | os.PathLike, *, lazy: bool | None = None) -> Run:
    """Open a run directory or a packed run file for reading.

    ``lazy``: read the per-step tables (``steps``, ``band``, including the per-layer band) on
    access, column by column and by row range (:class:`LazyTable`), instead of at open; only their
    ``step`` columns are read at open.  Default: lazy when the run's files hold more than
    ``LAZY_ABOVE`` (256 MiB; environment ``PHASEWATCH_LAZY_ABOVE``).  In a lazy run a damaged data
    chunk of those tables is reported when it is read (a one-line :class:`RunFormatError` that
    names the segment), not by skipping the segment at open.

    Raises :class:`RunFormatError` with a one-line message for a missing path, a foreign file or
    directory, or an unreadable packed file, and :class:`SchemaVersionError` for a newer schema.
    Before HDF5 reads a file's metadata in this process, the file is walked in a helper process
    with a time limit (see :func:`_guard_files`).
    """
    p = Path(path)
    if not p.exists():
        raise RunFormatError(f"{p}: no such file or directory; pass a run directory or a packed .h5 run")
    if p.is_dir():
        meta_path = p / fmt.META_FILE
        segs = sorted(p.glob(fmt.SEGMENT_GLOB))
        if meta_path.exists():
            try:
                if meta_path.stat().st_size > _MAX_META_BYTES:
                    raise RunFormatError(f"{meta_path}: {meta_path.stat().st_size:,} bytes; not a phasewatch meta.json")
                meta = _read_meta_json(meta_path.read_bytes(), str(meta_path))
            except (OSError, RunFormatError):
                meta = None
                if not segs:
                    raise RunFormatError(f"{meta_path}: unreadable metadata and no segments; not a usable run") from None
        else:
            meta = None
        sources, files = [], []
        for s in segs:
            try:
                index = int(s.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            sources.append((s.name, index, _FileSegment(s)))
            files.append(s)
        # The segment a live writer is writing is our own code's output, changing every flush:
        # it is not walked (that would tax every live read); closed segments are, once each.
        live = files[-1:] if files and writer_is_live(p) else []
        verdicts = _guard_files([f for f in files if f not in live])
        refused = {f.name: v for f, v in verdicts.items() if v}
        if meta is None:
            if not segs:
                raise RunFormatError(
                    f"{p}: not a phasewatch run (no {fmt.META_FILE} and no segment-*.h5 files)"
                )
            meta = _meta_from_segments(p, [s for s in segs if s.name not in refused], refused)
        check_schema(meta, str(meta_path))
        return Run(p, meta, sources, packed=False, refused=refused, lazy=lazy)
    if not _is_hdf5(p):
        raise RunFormatError(f"{p}: not an HDF5 file; pass a run directory or a file made by `phasewatch pack`")
    problem = _guard_files([p]).get(p)
    if problem:
        raise RunFormatError(f"{p}: {problem}")
    try:
        f = _open_h5(p)
    except OSError as e:
        raise RunFormatError(
            f"{p}: HDF5 file cannot be opened ({str(e).splitlines()[0]}); it may be truncated"
        ) from None
    try:
        fmt_name = f.attrs.get("format")
        if isinstance(fmt_name, bytes):
            fmt_name = fmt_name.decode()
        if fmt_name == fmt.FORMAT_NAME:
            # a single segment file given directly: read it as a one-segment run
            check_schema(f.attrs, str(p))
            meta = _read_meta_json(f.attrs["meta_json"], str(p))
            single = True
        elif fmt_name != fmt.PACKED_FORMAT_NAME:
            raise RunFormatError(f"{p}: HDF5 file but not a phasewatch run (no format mark); foreign file?")
        else:
            single = False
            check_schema(f.attrs, str(p))
            meta = _read_meta_json(f.attrs["meta_json"], str(p))
            link = f.get(fmt.PACKED_SEGMENTS, getlink=True)
            if not isinstance(link, h5py.HardLink) or not isinstance(f[fmt.PACKED_SEGMENTS], h5py.Group):
                raise RunFormatError(f"{p}: '{fmt.PACKED_SEGMENTS}' is missing or a link; refused")
            names = sorted(f[fmt.PACKED_SEGMENTS])
    except RunFormatError:
        raise
    except _READ_ERRORS as e:  # missing or broken attributes
        raise RunFormatError(f"{p}: damaged phasewatch file, no readable metadata ({_first_line(e)})") from None
    finally:
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a damaged file may fail too
            pass
    if single:
        return Run(p, meta, [(p.name, 0, _FileSegment(p))], packed=False, single_file=True, lazy=lazy)
    sources = [(f"{p.name}:{n}", int(n), _PackedSegment(n, p)) for n in names if n.isdigit()]
    return Run(p, meta, sources, packed=True, single_file=True, lazy=lazy)


def _meta_from_segments(run: Path, segs: list[Path], refused: dict[str, str] | None = None) -> dict:
    for s in reversed(segs):
        try:
            with _open_h5(s) as f:
                return _read_meta_json(f.attrs["meta_json"], str(s))
        except (RunFormatError, *_READ_ERRORS):
            continue
    why = "".join(f" ({name}: {v})" for name, v in list((refused or {}).items())[:1])
    raise RunFormatError(f"{run}: {fmt.META_FILE} missing and no segment readable{why}; not a usable run")


def __getattr__(name: str) -> int:
    """``guard_walks``, the files the metadata guard walked in this process, kept here for tests;
    it lives (and counts) in :mod:`phasewatch.store.guard`."""
    if name == "guard_walks":
        return guard.guard_walks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
