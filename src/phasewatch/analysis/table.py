"""``Table``: one result shape for every table of an :class:`~phasewatch.analysis.pipeline.Analysis`.

A table is a mapping of named column arrays of equal length (one row per window, step, probe,
measurement, event ...).  Columns are stored as computed, so a multi-column block such as the
singular values ``sigma`` (N, W) stays one (N, W) array: ``t["sigma"]`` returns it, bit for bit,
and iterating or ``items()`` yields the stored arrays as before.  The *flat* view — what
``keys()``, :attr:`columns`, :meth:`to_dataframe`, :meth:`to_csv` and ``pandas.DataFrame(t)`` see
— expands every 2-D block of width m into ``name_1 .. name_m`` (the per-window CSV's long-standing
``sigma_1 .. sigma_W``), and ``t["sigma_2"]`` is the view ``t["sigma"][:, 1]``.

It is a ``dict`` subclass so code written against the dict-of-arrays results keeps working
(``res.table["kstar"]``, ``"A_dk" in res.table``, ``res.probes.get("C")``, truthiness: a table
without columns is falsy).  ``len(t)`` is the number of rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError

__all__ = ["Table", "as_table"]


def _width(v: np.ndarray) -> int | None:
    """Columns of a 2-D block, None for a plain column."""
    return int(v.shape[1]) if v.ndim == 2 else None


def _cell(x) -> str:
    """One CSV cell: integers as integers, floats by ``repr`` (round-trip exact), NaN empty, text as is."""
    if isinstance(x, (bytes, np.bytes_)):
        return x.decode()
    if isinstance(x, (str, np.str_)):
        return str(x)
    if isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if isinstance(x, (np.integer, int)):
        return str(int(x))
    x = float(x)
    return "" if math.isnan(x) else repr(x)


class Table(dict):
    """Named column arrays of one analysis table (see the module docstring).

    ``Table(columns, name="")``: ``columns`` a mapping of name -> array (1-D, or 2-D for a block of
    columns), all with the same number of rows.
    """

    def __init__(self, columns: dict[str, Any] | Iterable | None = None, name: str = "") -> None:
        super().__init__(columns or {})
        self.name = name

    # -- the flat view ---------------------------------------------------------------------
    def _flat(self):
        for k, v in dict.items(self):
            v = np.asarray(v)
            w = _width(v)
            if w is None:
                yield k, v
            else:
                for j in range(w):
                    yield f"{k}_{j + 1}", v[:, j]

    def _lookup(self, key: str):
        head, _, idx = str(key).rpartition("_")
        if head and idx.isdigit() and dict.__contains__(self, head):
            v = np.asarray(dict.__getitem__(self, head))
            j = int(idx) - 1
            if v.ndim == 2 and 0 <= j < v.shape[1]:
                return v[:, j]
        raise KeyError(key)

    def __getitem__(self, key):
        try:
            return dict.__getitem__(self, key)
        except KeyError:
            return self._lookup(key)

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        try:
            self._lookup(key)
        except (KeyError, TypeError):
            return False
        return True

    def get(self, key, default=None):
        """``self[key]`` (a block or a flat column), else ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:  # type: ignore[override]
        """The flat column names (2-D blocks expanded to ``name_1 .. name_m``): what pandas sees."""
        return [k for k, _ in self._flat()]

    @property
    def columns(self) -> list[str]:
        """The flat column names, as in :meth:`to_dataframe` and :meth:`to_csv`."""
        return self.keys()

    def blocks(self) -> list[tuple[str, np.ndarray]]:
        """(name, array) as stored (2-D blocks whole); the same as ``items()``."""
        return list(dict.items(self))

    def flat(self) -> dict[str, np.ndarray]:
        """Every flat column by name (views into the stored blocks, no copies)."""
        return dict(self._flat())

    def __len__(self) -> int:
        """Rows (0 for a table without columns)."""
        for v in dict.values(self):
            return int(np.shape(v)[0]) if np.ndim(v) else 1
        return 0

    def __bool__(self) -> bool:
        """True when the table has columns (as for the dicts it replaces), even with no rows."""
        return dict.__len__(self) > 0

    def __repr__(self) -> str:
        return f"Table({self.name or 'unnamed'}: {len(self)} rows; {', '.join(self.keys()[:12])}" + \
            (", ..." if len(self.keys()) > 12 else "") + ")"

    def copy(self) -> Table:
        """A shallow copy (the same arrays), as a Table."""
        return Table(dict(dict.items(self)), self.name)

    # -- export ------------------------------------------------------------------------------
    def to_dataframe(self, index: str | None = None):
        """The flat columns as a pandas DataFrame (needs pandas); ``index``: a column to index by."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - depends on the environment
            raise PhasewatchError("to_dataframe needs pandas: pip install pandas") from None
        cols = {}
        for k, v in self._flat():
            if v.ndim != 1:
                v = v.reshape(len(v), -1) if v.ndim > 1 else v.reshape(-1)
                if v.ndim != 1:
                    raise PhasewatchError(f"column {k!r} has {v.ndim} dimensions; a DataFrame holds 1-D columns")
            cols[k] = v.astype(str) if v.dtype.kind in "SO" and v.size and isinstance(v[0], bytes) else v
        df = pd.DataFrame(cols)
        return df.set_index(index) if index is not None else df

    def to_csv(self, path: str | Path, header: str | None = None) -> Path:
        """The flat columns as CSV (``header``: a ``#`` comment line first); integers and booleans as
        integers, floats by ``repr`` (exact round trip), NaN as an empty cell."""
        path = Path(path)
        cols = self.flat()
        names = list(cols)
        with open(path, "w") as fh:
            if header:
                fh.write("# " + header.replace("\n", " ") + "\n")
            fh.write(",".join(names) + "\n")
            for i in range(len(self)):
                fh.write(",".join(_cell(cols[n][i]) for n in names) + "\n")
        return path


def as_table(columns: dict | None, name: str = "") -> Table:
    """``columns`` as a :class:`Table` (a Table is returned as is, renamed if it had no name)."""
    if isinstance(columns, Table):
        if not columns.name:
            columns.name = name
        return columns
    return Table(columns or {}, name)
