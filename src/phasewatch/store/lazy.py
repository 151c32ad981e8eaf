"""The per-step tables of a lazy run (:func:`~phasewatch.store.open_run` ``lazy=``), read on access.

A :class:`LazyTable` is a read-only mapping column -> array that reads a column from the segments
when first asked for, and a range of rows without reading whole columns (:meth:`LazyTable.rows`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from ..errors import RunFormatError
from .segments import _READ_ERRORS, _unreadable, read_table

_ROW = "\0row"  # pseudo-column of a lazy table while loading: the row's index within its segment


class LazyTable(Mapping):
    """A per-step table of a lazy run: a read-only mapping column -> array whose columns are read
    from the segments when first asked for (then kept), and whose :meth:`rows` reads a range of
    rows with one h5py slice per segment and column, keeping nothing.  Rows are those of the eager
    reader: segments in order, rows of an interrupted trajectory dropped where a resumed session
    starts.  Pickles as a reference to the run's files (cached columns are not sent along).

    ``run`` is the :class:`~phasewatch.store.reader.Run` that owns the table (its ``meta``,
    ``path``, segment openers and guard); not imported here, so that reader → lazy stays one way."""

    def __init__(self, run: Any, name: str, columns: list[str], parts: list[tuple[str, dict[str, np.ndarray]]]):
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
