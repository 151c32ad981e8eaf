"""Writing a run: block-buffered, columnar appends to rotating HDF5 segments in SWMR mode.

:class:`RunWriter` is numpy-level and framework-agnostic: the torch recorder uses it, and so can
any other training framework (JAX, plain numpy) that wants to write the phasewatch run format.

Crash safety: rows are buffered in memory and written in blocks.  A block is written to every
dataset of its table, the file is flushed, then the table's ``committed_rows`` is advanced and the
file flushed again.  A process killed at any moment therefore leaves every row counted in
``committed_rows`` on disk; rows beyond it are ignored by readers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import RunFormatError, SchemaVersionError
from . import format as fmt

log = logging.getLogger("phasewatch")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".meta-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def tables_to_meta(tables: list[fmt.TableSpec]) -> dict:
    return {t.name: {c: [col.dtype, list(col.shape)] for c, col in t.columns.items()} for t in tables}


def create_table(parent: h5py.Group, spec: fmt.TableSpec, compression: str | None = None) -> None:
    """Create the empty, resizable datasets of one table and its ``committed_rows`` counter."""
    g = parent.create_group(spec.name)
    rows = spec.chunk_rows()
    for name, col in spec.columns.items():
        chunk_tail = col.shape
        if col.shape:
            # long rows (snapshots, checkpoints): chunk along the row, at most 4 Mi values
            width = int(np.prod(col.shape))
            if width > (1 << 22):
                chunk_tail = (min(col.shape[0], 1 << 22), *col.shape[1:]) if len(col.shape) == 1 else col.shape
        g.create_dataset(
            name,
            shape=(0, *col.shape),
            maxshape=(None, *col.shape),
            chunks=(rows, *chunk_tail),
            dtype=col.dtype,
            fletcher32=True,
            compression=compression,
        )
    g.create_dataset(fmt.COMMITTED, shape=(1,), dtype="i8", data=[0])


class RunWriter:
    """Append rows to a run directory.

    Parameters
    ----------
    path:
        Run directory (created if missing).
    meta:
        JSON-serialisable metadata (model, optimizer, recorder config, seeds ...).  The writer adds
        ``format``, ``schema_version``, ``run_id``, ``tables`` and ``sessions``.
    tables:
        The table specs, created in every segment.
    resume:
        Continue an existing run in a new segment.  Without it an existing run is an error.
    block_rows, flush_seconds:
        Write a table when this many rows are buffered, and everything when this long has
        passed since the last write.
    rotate_rows, rotate_seconds:
        Start a new segment after this many ``steps`` rows or this long.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict,
        tables: list[fmt.TableSpec],
        *,
        resume: bool = False,
        block_rows: int = 256,
        flush_seconds: float = 10.0,
        rotate_rows: int = 1_000_000,
        rotate_seconds: float = 3600.0,
    ) -> None:
        self.path = Path(path)
        self.tables = {t.name: t for t in tables}
        self.block_rows = int(block_rows)
        self.flush_seconds = float(flush_seconds)
        self.rotate_rows = int(rotate_rows)
        self.rotate_seconds = float(rotate_seconds)
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in self.tables}
        self._buffered: dict[str, int] = {t: 0 for t in self.tables}
        self._file: h5py.File | None = None
        self._closed = False

        self.path.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.path.glob(fmt.SEGMENT_GLOB))
        meta_path = self.path / fmt.META_FILE
        table_meta = tables_to_meta(tables)
        if existing or meta_path.exists():
            if not resume:
                raise RunFormatError(
                    f"{self.path}: a run already exists here; pass resume=True to continue it "
                    "or choose a new path"
                )
            old = self._read_meta(meta_path)
            if old.get("tables") != table_meta:
                raise RunFormatError(
                    f"{self.path}: cannot resume: the recorder's tables differ from the run's "
                    "(different K, layers or snapshot size); record into a new path"
                )
            self.meta = old
            self.meta.setdefault("sessions", [])
            indices = [int(p.stem.split("-")[1]) for p in existing if p.stem.split("-")[1].isdigit()]
            self._next_segment = max(indices, default=-1) + 1
        else:
            self.meta = dict(meta)
            self.meta.update(
                format=fmt.FORMAT_NAME,
                schema_version=fmt.SCHEMA_VERSION,
                run_id=uuid.uuid4().hex,
                tables=table_meta,
                sessions=[],
            )
            self._next_segment = 0
        self.meta["sessions"].append(
            {"first_segment": self._next_segment, "started": time.time(), "resumed": bool(existing)}
        )
        write_json_atomic(meta_path, self.meta)
        self._open_segment()

    @staticmethod
    def _read_meta(meta_path: Path) -> dict:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise RunFormatError(
                f"{meta_path}: cannot read run metadata ({e}); run `phasewatch repair` first"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != fmt.FORMAT_NAME:
            raise RunFormatError(f"{meta_path}: not a phasewatch run; choose another path")
        try:
            version = int(meta.get("schema_version", 0))
        except (TypeError, ValueError):
            raise RunFormatError(f"{meta_path}: invalid schema version; cannot resume this run") from None
        if version > fmt.SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{meta_path}: written with schema {meta['schema_version']}, newer than this "
                f"phasewatch ({fmt.SCHEMA_VERSION}); upgrade phasewatch to resume it"
            )
        return meta

    # -- segments ---------------------------------------------------------------------------
    def _open_segment(self) -> None:
        index = self._next_segment
        self._next_segment += 1
        name = self.path / fmt.segment_name(index)
        # Built under a temporary name and renamed once in SWMR mode: until then HDF5 holds an
        # exclusive lock, so a reader listing the run in between would fail on a half-made segment
        # (and a crash in between would leave one behind).
        tmp = name.with_name(name.name + ".new")
        f = h5py.File(tmp, "w", libver="latest")
        try:
            f.attrs["format"] = fmt.FORMAT_NAME
            f.attrs["schema_version"] = fmt.SCHEMA_VERSION
            f.attrs["segment"] = index
            f.attrs["run_id"] = self.meta["run_id"]
            f.attrs["created"] = time.time()
            f.attrs["meta_json"] = json.dumps(self.meta, sort_keys=True, default=_json_default)
            for spec in self.tables.values():
                create_table(f, spec)
            f.swmr_mode = True
            os.replace(tmp, name)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        self._file = f
        self.segment_index = index
        self._segment_started = time.monotonic()
        self._last_flush = time.monotonic()
        self._segment_rows = 0

    def _close_segment(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    # -- appending --------------------------------------------------------------------------
    def append(self, table: str, **columns: np.ndarray) -> None:
        """Buffer a batch of rows (every column an array whose first axis is the row)."""
        if self._closed:
            raise RunFormatError(f"{self.path}: the writer is closed")
        spec = self.tables[table]
        if set(columns) != set(spec.columns):
            missing = set(spec.columns) - set(columns)
            extra = set(columns) - set(spec.columns)
            raise ValueError(f"table {table!r}: missing columns {sorted(missing)}, unknown {sorted(extra)}")
        n = None
        batch = {}
        for name, col in spec.columns.items():
            a = np.asarray(columns[name], dtype=col.dtype)
            if a.shape[1:] != col.shape:
                a = a.reshape((-1, *col.shape))
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"table {table!r}: columns have different row counts")
            batch[name] = a
        if not n:
            return
        self._buffers[table].append(batch)
        self._buffered[table] += n
        if self._buffered[table] >= self.block_rows or (
            time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self, rotate: bool = True) -> None:
        """Write every buffered row, then advance ``committed_rows``, flushing around it; then
        start a new segment if this one is due (``rotate=False``: never)."""
        f = self._file
        if f is None:
            return
        pending = [t for t in self.tables if self._buffered[t]]
        new_counts = {}
        for t in pending:
            batches = self._buffers[t]
            g = f[t]
            old = int(g[fmt.COMMITTED][0])
            n = self._buffered[t]
            for name in self.tables[t].columns:
                data = batches[0][name] if len(batches) == 1 else np.concatenate([b[name] for b in batches])
                ds = g[name]
                ds.resize(old + n, axis=0)
                ds[old:] = data
            new_counts[t] = old + n
        if pending:
            f.flush()  # the data reaches the file before the count that vouches for it
            for t, count in new_counts.items():
                f[t][fmt.COMMITTED][0] = count
                self._buffers[t] = []
                self._buffered[t] = 0
            f.flush()
            self._segment_rows = int(f["steps"][fmt.COMMITTED][0]) if "steps" in f else 0
        self._last_flush = time.monotonic()
        if rotate and self._segment_rows and (
            self._segment_rows >= self.rotate_rows
            or time.monotonic() - self._segment_started >= self.rotate_seconds
        ):
            self.rotate()

    def rotate(self) -> None:
        """Close the current segment (after writing what is buffered) and start the next one."""
        self.flush(rotate=False)
        self._close_segment()
        self._open_segment()

    def update_meta(self, **items: Any) -> None:
        """Merge items into ``meta.json`` (atomic rewrite)."""
        self.meta.update(items)
        write_json_atomic(self.path / fmt.META_FILE, self.meta)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush(rotate=False)
        finally:
            self._close_segment()
            self._closed = True

    def abandon(self) -> None:
        """Close the file without writing buffers (after a write error); committed rows stay."""
        self._closed = True
        try:
            self._close_segment()
        except Exception:  # noqa: BLE001 - the file may be unusable; nothing more to save
            pass

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
