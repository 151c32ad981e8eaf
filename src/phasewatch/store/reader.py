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

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import InvalidArgumentError, RunFormatError, SchemaVersionError
from . import format as fmt
from .hdf5 import has_signature, superblock_eof
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
_ROW = "\0row"  # pseudo-column of a lazy table while loading: the row's index within its segment


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


def _open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, also while a SWMR writer has it open or after it was killed.

    A plain open comes first: it checks the file's length and fails fast on a truncated file.
    Only a file whose superblock says a writer has it open (running, or killed) is opened in
    SWMR-read mode, and only after checking that it is not shorter than its superblock says:
    HDF5 retries SWMR metadata reads with an exponentially growing sleep, so a SWMR open of a
    truncated file does not fail, it hangs.
    """
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open" not in str(e) and "lock" not in str(e):
            raise
    for _ in range(4):
        eof, size = superblock_eof(path), os.path.getsize(path)
        if eof is None or size >= eof:
            break
        time.sleep(0.05)  # a live writer extends the file right after writing its superblock
    else:
        raise OSError(f"truncated file: {size} bytes but its superblock records {eof}")
    return h5py.File(path, "r", swmr=True)


class _UnsafeContentError(RunFormatError):
    """A link or dataset that may point outside the run: the run is refused, not skipped."""


# Filters phasewatch writes (deflate, shuffle, fletcher32); anything else is refused.  Deflate
# cannot expand data more than ~1032x, so a chunk cannot honestly hold more than this per byte.
_KNOWN_FILTERS = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32}
_MAX_DEFLATE_RATIO = 1100
_MAX_META_BYTES = 256 << 20  # a real meta.json is kilobytes to a few megabytes
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, RecursionError, MemoryError,
                AttributeError, IndexError)


def check_schema(attrs_or_meta, where: str) -> None:
    if not hasattr(attrs_or_meta, "get"):
        raise RunFormatError(f"{where}: not a phasewatch run (metadata is not a JSON object)")
    fmt_name = attrs_or_meta.get("format")
    if isinstance(fmt_name, bytes):
        fmt_name = fmt_name.decode()
    if fmt_name not in (fmt.FORMAT_NAME, fmt.PACKED_FORMAT_NAME):
        raise RunFormatError(f"{where}: not a phasewatch run (no '{fmt.FORMAT_NAME}' format mark)")
    try:
        version = int(attrs_or_meta.get("schema_version", 0))
    except (TypeError, ValueError):
        raise RunFormatError(
            f"{where}: invalid schema version {attrs_or_meta.get('schema_version')!r}"
        ) from None
    if version > fmt.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where}: written with run schema {version}, newer than this phasewatch reads "
            f"({fmt.SCHEMA_VERSION}); upgrade phasewatch (pip install -U phasewatch)"
        )
    if version < 1:
        raise RunFormatError(f"{where}: invalid schema version {version}")


def _check_safe(group: h5py.Group, where: str, seen: set | None = None) -> None:
    """Refuse external links, soft links, external raw storage and virtual datasets."""
    seen = set() if seen is None else seen
    if hash(group.id) in seen:
        raise RunFormatError(f"{where}: a group that contains itself (hard-link cycle); damaged or hostile file")
    seen.add(hash(group.id))
    for name in group:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise _UnsafeContentError(
                f"{where}/{name}: is a {type(link).__name__}; phasewatch refuses links that may "
                "point outside the run"
            )
        obj = group[name]
        if isinstance(obj, h5py.Group):
            _check_safe(obj, f"{where}/{name}", seen)
        elif isinstance(obj, h5py.Dataset):
            if obj.is_virtual or obj.external:
                raise _UnsafeContentError(
                    f"{where}/{name}: virtual or external dataset; phasewatch refuses data stored "
                    "outside the run file"
                )


def read_table(
    group: h5py.Group, spec_cols: dict | None, where: str, only: tuple[str, ...] | None = None,
    rows: np.ndarray | None = None, span: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Read one table's committed rows (trimmed to the shortest column); ``only`` some columns;
    ``rows``: only these (increasing) row indices; ``span``: only rows ``a <= i < b`` (one
    h5py slice per column)."""
    if fmt.COMMITTED not in group:
        raise RunFormatError(f"{where}: table without '{fmt.COMMITTED}'; not a phasewatch table")
    cds = group[fmt.COMMITTED]
    if not isinstance(cds, h5py.Dataset) or cds.shape not in ((1,), ()) or cds.dtype.kind not in "iu":
        raise RunFormatError(f"{where}/{fmt.COMMITTED}: not a one-element integer count; damaged or foreign file")
    committed = int(cds[()] if cds.shape == () else cds[0])
    if committed < 0:
        raise RunFormatError(f"{where}/{fmt.COMMITTED}: negative count {committed}; damaged or foreign file")
    names = [n for n in group if n != fmt.COMMITTED]
    if spec_cols is not None:
        missing = [n for n in spec_cols if n not in group]
        if missing:
            raise RunFormatError(f"{where}: column {missing[0]!r} is missing; the file is damaged or foreign")
        names = [n for n in spec_cols if n in group] + [n for n in names if n not in spec_cols]
    if "step" not in names:
        raise RunFormatError(f"{where}: no 'step' column; not a phasewatch table")
    datasets = {}
    for name in names:
        ds = group[name]
        if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
            raise RunFormatError(f"{where}/{name}: not a column (a group or a scalar); damaged or foreign file")
        datasets[name] = ds
    lengths = [ds.shape[0] for ds in datasets.values()]
    # A count a little beyond the data is trimmed to the shortest column, without a warning: while
    # a writer has the file open, a SWMR reader's view of a column's length routinely lags the
    # count (tests/fault/test_concurrency.py); after a crash it is data lost after the count was
    # written.  A count the whole file could not hold is damage or forgery: refused.
    row_bytes = sum(max(1, int(np.prod(ds.shape[1:], dtype=object)) * ds.dtype.itemsize)
                    for ds in datasets.values())
    capacity = _MAX_DEFLATE_RATIO * os.path.getsize(group.file.filename)
    if committed > 0 and row_bytes and committed * row_bytes > capacity:
        raise RunFormatError(
            f"{where}/{fmt.COMMITTED}: {committed:,} rows of {row_bytes:,} bytes cannot fit in a file "
            "of this size; damaged or hostile file, refused"
        )
    n = max(0, min([committed, *lengths]))
    out = {}
    for name in names:
        if only is not None and name not in only:
            continue
        ds = datasets[name]
        if span is not None and not 0 <= span[0] <= span[1] <= n:
            raise InvalidArgumentError(f"{where}: rows {span[0]}:{span[1]} outside the {n} committed rows")
        want = n if rows is None and span is None else (len(rows) if rows is not None else span[1] - span[0])
        _check_declared_size(ds, want, f"{where}/{name}")
        if spec_cols is not None and name in spec_cols:
            want_dtype, want_shape = spec_cols[name]
            if tuple(ds.shape[1:]) != tuple(want_shape) or np.dtype(ds.dtype).kind != np.dtype(want_dtype).kind:
                raise RunFormatError(
                    f"{where}/{name}: shape {ds.shape[1:]} / dtype {ds.dtype} do not match the run's "
                    f"schema ({tuple(want_shape)} / {want_dtype}); the file is damaged or foreign"
                )
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) and (rows[-1] >= n or np.any(np.diff(rows) <= 0)):
                raise InvalidArgumentError(f"{where}: rows must increase and lie below {n}")
        # A writer that has the file open (SWMR) rewrites the chunk holding the newest rows in
        # place; a read overlapping that write sees a torn chunk that fails its checksum.  Such a
        # read is retried a few times before the chunk is called corrupted.
        tries = 6 if group.file.swmr_mode else 1
        for attempt in range(tries):
            try:
                if span is not None:
                    out[name] = ds[span[0]:span[1]]
                else:
                    out[name] = ds[:n] if rows is None else (ds[rows] if len(rows) else ds[:0])
                break
            except OSError as e:
                msg = str(e).splitlines()[0]
                if "fletcher" in msg.lower() or "checksum" in msg.lower() or "filter" in msg.lower():
                    if attempt + 1 < tries:
                        time.sleep(0.005 * 2**attempt)
                        continue
                    raise RunFormatError(
                        f"{where}/{name}: checksum mismatch (data corrupted on disk); run "
                        "`phasewatch repair` to drop the damaged segment"
                    ) from None
                raise RunFormatError(f"{where}/{name}: cannot read ({msg})") from None
    return out


def _check_declared_size(ds: h5py.Dataset, n: int, where: str) -> None:
    """Refuse to read ``n`` rows that the file cannot hold: a declared size beyond the bytes
    stored (at most ~1032x for deflate) would make numpy allocate memory for data that is not
    there (an allocation bomb), and only a damaged or hostile file declares it."""
    if ds.dtype.kind not in "biufcS" or ds.dtype.hasobject:
        raise RunFormatError(f"{where}: unsupported dtype {ds.dtype}; not written by phasewatch")
    need = n * int(np.prod(ds.shape[1:], dtype=object)) * ds.dtype.itemsize
    if need == 0:
        return
    plist = ds.id.get_create_plist()
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    unknown = filters - _KNOWN_FILTERS
    if unknown:
        raise RunFormatError(f"{where}: HDF5 filter {sorted(unknown)} is not one phasewatch writes; refused")
    ratio = _MAX_DEFLATE_RATIO if h5py.h5z.FILTER_DEFLATE in filters else 1
    stored = min(ds.id.get_storage_size(), os.path.getsize(ds.file.filename))
    if need > ratio * stored:
        raise RunFormatError(
            f"{where}: declares {n:,} rows ({need:,} bytes) but the file stores {stored:,} bytes for "
            "them; damaged or hostile file, refused (no memory was allocated for it)"
        )


def _check_table_spec(meta: dict, where: str) -> None:
    """The metadata's table declarations: {table: {column: [dtype, [row shape]]}}."""
    tables = meta.get("tables", {})
    ok = isinstance(tables, dict) and all(isinstance(cols, dict) for cols in tables.values())
    for cols in tables.values() if ok else ():
        for spec in cols.values():
            ok = (isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[0], str)
                  and isinstance(spec[1], (list, tuple))
                  and all(isinstance(x, int) and 0 <= x < 2**31 for x in spec[1]))
            if ok:
                try:
                    ok = np.dtype(spec[0]).kind in "biufcS"
                except (TypeError, ValueError):
                    ok = False
            if not ok:
                break
        if not ok:
            break
    if not ok:
        raise RunFormatError(f"{where}: the metadata's table declarations are damaged or foreign; "
                             "not a readable phasewatch run")


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


class LazyTable(Mapping):
    """A per-step table of a lazy run: a read-only mapping column -> array whose columns are read
    from the segments when first asked for (then kept), and whose :meth:`rows` reads a range of
    rows with one h5py slice per segment and column, keeping nothing.  Rows are those of the eager
    reader: segments in order, rows of an interrupted trajectory dropped where a resumed session
    starts.  Pickles as a reference to the run's files (cached columns are not sent along)."""

    def __init__(self, run: Run, name: str, columns: list[str], parts: list[tuple[str, dict[str, np.ndarray]]]):
        self._run, self.name = run, name
        self._columns = list(dict.fromkeys([*columns, "step"]))  # the eager reader's order
        self._parts: list[tuple[str, np.ndarray, int]] = []  # (segment label, rows in it, first global row)
        off = 0
        for label, t in parts:
            self._parts.append((label, np.asarray(t[_ROW], dtype=np.int64), off))
            off += len(t[_ROW])
        self.n_rows = off
        steps = [t["step"] for _, t in parts]
        self._cache: dict[str, np.ndarray] = {"step": np.concatenate(steps) if steps else np.empty(0, "i8")}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {"step": self._cache["step"]}
        return state

    def __len__(self) -> int:
        return len(self._columns)

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __contains__(self, name: object) -> bool:
        return name in self._columns

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._columns:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self.rows(0, self.n_rows, (name,))[name]
        return self._cache[name]

    @property
    def loaded(self) -> tuple[str, ...]:
        """The columns held in memory (read whole by an earlier access); ``step`` always is."""
        return tuple(self._cache)

    def __repr__(self) -> str:
        return f"<LazyTable {self.name!r}: {self.n_rows} rows, columns {', '.join(self._columns)}>"

    def _empty(self, name: str) -> np.ndarray:
        dt, shape = self._run.meta.get("tables", {}).get(self.name, {}).get(name, ("f8", ()))
        return np.empty((0, *shape), dtype=dt)

    def rows(self, start: int, stop: int, columns=None) -> dict[str, np.ndarray]:
        """Rows ``start <= i < stop`` (clipped to the table) of ``columns`` (default: all)."""
        start, stop = max(0, int(start)), min(self.n_rows, int(stop))
        stop = max(start, stop)
        cols = list(self._columns if columns is None else columns)
        for c in cols:
            if c not in self._columns:
                raise KeyError(f"{self._run.path}: table {self.name!r} has no column {c!r}")
        out = {c: self._cache[c][start:stop] for c in cols if c in self._cache}
        read = [c for c in cols if c not in out]
        if read:
            pieces: dict[str, list[np.ndarray]] = {c: [] for c in read}
            for label, local, off in self._parts:
                a, b = max(start, off), min(stop, off + len(local))
                if a >= b:
                    continue
                idx = local[a - off: b - off]
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                data = self._read_segment(label, read, (lo, hi))
                for c in read:
                    pieces[c].append(data[c] if hi - lo == len(idx) else data[c][idx - lo])
            for c in read:
                out[c] = np.concatenate(pieces[c]) if pieces[c] else self._empty(c)
        return {c: out[c] for c in cols}

    def _read_segment(self, label: str, cols: list[str], span: tuple[int, int]) -> dict[str, np.ndarray]:
        run = self._run
        run._guard()
        try:
            with run._openers[label]() as (group, where):
                if self.name not in group or not isinstance(group[self.name], h5py.Group):
                    raise RunFormatError(f"{where}: table {self.name!r} is gone; the segment changed since "
                                         "the run was opened")
                data = read_table(group[self.name], run.meta.get("tables", {}).get(self.name),
                                  f"{where}:{self.name}", only=tuple(cols), span=span)
        except RunFormatError:
            raise
        except _READ_ERRORS as e:
            raise _unreadable(label, self.name, e, "; `phasewatch repair` sets it aside") from None
        missing = [c for c in cols if c not in data]
        if missing:
            raise RunFormatError(f"{label}:{self.name}: column {missing[0]!r} is missing; damaged or foreign segment")
        return data


def _first_line(e: BaseException) -> str:
    """The first line of an h5py/OS error, cut to 200 characters (for one-line messages)."""
    return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]


def _unreadable(label: str, table: str, e: BaseException, hint: str = "") -> RunFormatError:
    """The one-line error for a table of a segment that cannot be read (anymore)."""
    return RunFormatError(f"{label}:{table}: cannot read ({type(e).__name__}: {_first_line(e)}); "
                          f"the segment changed or is damaged{hint}")


class _FileSegment:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self):
        return self

    def __enter__(self):
        self.f = _open_h5(self.path)
        return self.f, str(self.path)

    def __exit__(self, *exc):
        self.f.close()
        self.f = None


class _PackedSegment:
    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def __call__(self):
        return self

    def __enter__(self):
        self.f = _open_h5(self.path)
        return self.f[fmt.PACKED_SEGMENTS][self.name], f"{self.path}:{self.name}"

    def __exit__(self, *exc):
        self.f.close()
        self.f = None


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return has_signature(head) or h5py.is_hdf5(str(path))


def _read_meta_json(text: str | bytes, where: str) -> dict:
    """Parse run metadata; a damaged, enormous or absurdly nested document is a one-line error."""
    if isinstance(text, np.ndarray) and text.shape == ():
        text = text[()]
    if not isinstance(text, (str, bytes)):
        raise RunFormatError(f"{where}: metadata is not a JSON string; damaged or foreign file")
    if len(text) > _MAX_META_BYTES:
        raise RunFormatError(f"{where}: metadata of {len(text):,} bytes; not a phasewatch run")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise RunFormatError(f"{where}: unreadable metadata ({first})") from None
    if not isinstance(meta, dict):
        raise RunFormatError(f"{where}: metadata is not a JSON object; damaged or foreign file")
    return meta


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


# ------------------------------------------------------------------------------------------------
# The metadata guard.  Some corruptions (found by fuzzing: a zeroed run of bytes in an attribute
# message) make HDF5 2.0 loop forever inside the C library, where no signal or thread can interrupt
# it.  So before this process lets HDF5 read a file's metadata, a helper process walks every
# object, attribute and chunk index of it, as the reader will, with a time limit
# (``PHASEWATCH_OPEN_TIMEOUT`` seconds, default 60; 0 disables the guard).  The helper is spawned
# once per process (not forked: a loaded torch is no concern) and reused; verdicts are cached per
# file identity (path, device, inode, size, mtime), so a closed segment is walked once per process
# and a follower re-reading a live run pays nothing for it.

_GUARD_HELPER = r"""
import json, os, sys, time
import h5py

def open_h5(path, eof):
    # eof: the end of file its superblock records (store.hdf5.superblock_eof, read by the parent)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if "already open" not in str(e) and "lock" not in str(e):
            raise
    if eof is not None and os.path.getsize(path) < eof:
        raise OSError("truncated")
    return h5py.File(path, "r", swmr=True)

def walk(g, seen):
    if hash(g.id) in seen:
        return
    seen.add(hash(g.id))
    for k in g.attrs:
        g.attrs[k]
    for name in g:
        if not isinstance(g.get(name, getlink=True), h5py.HardLink):
            continue  # the reader refuses links; never follow one here
        obj = g.get(name)
        if isinstance(obj, h5py.Group):
            walk(obj, seen)
        elif isinstance(obj, h5py.Dataset):
            obj.shape, obj.dtype, obj.chunks, obj.is_virtual, obj.external
            [obj.attrs[k] for k in obj.attrs]
            plist = obj.id.get_create_plist()
            [plist.get_filter(i) for i in range(plist.get_nfilters())]
            obj.id.get_storage_size()  # walks the chunk index
            if obj.chunks is not None:
                obj.id.get_num_chunks()
            if obj.size <= 16 and obj.dtype.kind in "iu":
                obj[()]

print("ready", flush=True)
for line in sys.stdin:
    try:
        with open_h5(*json.loads(line)) as f:
            walk(f, set())
        out = {"status": "ok"}
    except MemoryError:
        out = {"status": "memory"}
    except BaseException as e:  # the reader reports ordinary errors itself; only hangs, crashes
        out = {"status": "error", "type": type(e).__name__}  # and allocation bombs matter here
    print(json.dumps(out), flush=True)
"""

_guard_lock = threading.Lock()
_guard_proc: subprocess.Popen | None = None
_guard_cache: dict[tuple, str | None] = {}
_guard_orphans: list = []  # helpers inherited by a forked child: the parent's, left alone
guard_walks = 0  # files walked by the helper in this process (for tests)


def _guard_limit() -> float:
    try:
        return float(os.environ.get("PHASEWATCH_OPEN_TIMEOUT", "60"))
    except ValueError:
        return 60.0


def _stop_helper() -> None:
    global _guard_proc
    proc, _guard_proc = _guard_proc, None
    if proc is None:
        return
    try:
        proc.kill()
        proc.wait(timeout=5)
    except Exception:  # noqa: BLE001
        pass
    for fh in (proc.stdin, proc.stdout):
        try:
            fh.close()
        except Exception:  # noqa: BLE001
            pass


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """One line from the helper, or None on timeout; '' if it died."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        buf += chunk
    return buf.decode(errors="replace")


def _helper() -> subprocess.Popen | None:
    global _guard_proc
    if _guard_proc is not None and _guard_proc.poll() is None:
        return _guard_proc
    _stop_helper()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _GUARD_HELPER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    except OSError as e:  # cannot start a child here: skip the check rather than refuse files
        log.debug("phasewatch: metadata guard unavailable (%s)", e)
        return None
    _guard_proc = proc
    if _read_line(proc, max(30.0, _guard_limit())) != "ready\n":
        _stop_helper()
        log.debug("phasewatch: metadata guard did not start")
        return None
    return proc


def _superblock_eof_or_none(path: Path) -> int | None:
    try:
        return superblock_eof(path)
    except OSError:
        return None  # the helper's own open reports it


def _walk_in_helper(path: Path, limit: float) -> tuple[bool, str | None]:
    """(known, problem): whether the helper gave a verdict, and the problem it found if any."""
    global guard_walks
    proc = _helper()
    if proc is None:
        return False, None
    try:
        proc.stdin.write((json.dumps([str(path), _superblock_eof_or_none(path)]) + "\n").encode())
    except OSError:
        _stop_helper()
        return False, None
    guard_walks += 1
    line = _read_line(proc, limit)
    if line is None:
        _stop_helper()
        return True, (f"reading its HDF5 metadata did not finish in {limit:g} s; the file is damaged "
                      "(HDF5 loops on some corruptions): use an intact copy")
    if line == "":
        _stop_helper()
        return True, "reading its HDF5 metadata crashed the HDF5 library; the file is damaged: use an intact copy"
    try:
        status = json.loads(line).get("status")
    except ValueError:
        status = None
    if status == "memory":
        return True, "its HDF5 metadata declares more memory than exists; damaged or hostile file, refused"
    return True, None


def _guard_files(paths: list[Path]) -> dict[Path, str | None]:
    """Walk each file's metadata in the helper (cached per file identity); the problem per file."""
    limit = _guard_limit()
    out: dict[Path, str | None] = {}
    if limit <= 0 or not paths:
        return out
    with _guard_lock:
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue  # the reader reports it
            key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key in _guard_cache:
                out[path] = _guard_cache[key]
                continue
            known, problem = _walk_in_helper(path, limit)
            if known:
                if len(_guard_cache) > 10_000:
                    _guard_cache.clear()
                _guard_cache[key] = problem
            out[path] = problem
    return out


def _forget_helper_in_child() -> None:
    global _guard_proc, _guard_lock
    if _guard_proc is not None:
        _guard_orphans.append(_guard_proc)  # the parent's helper: neither used nor killed here
    _guard_proc = None
    _guard_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper_in_child)


@atexit.register
def _close_helper_at_exit() -> None:
    proc = _guard_proc
    if proc is None:
        return
    try:
        proc.stdin.close()  # the helper ends at end of input
        proc.wait(timeout=2)
    except Exception:  # noqa: BLE001
        _stop_helper()


def _meta_from_segments(run: Path, segs: list[Path], refused: dict[str, str] | None = None) -> dict:
    for s in reversed(segs):
        try:
            with _open_h5(s) as f:
                return _read_meta_json(f.attrs["meta_json"], str(s))
        except (RunFormatError, *_READ_ERRORS):
            continue
    why = "".join(f" ({name}: {v})" for name, v in list((refused or {}).items())[:1])
    raise RunFormatError(f"{run}: {fmt.META_FILE} missing and no segment readable{why}; not a usable run")
