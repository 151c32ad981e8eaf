"""One HDF5 file of a run, read as untrusted input: open it, check it, read a table.

Every check the reader makes before it reads (issue 8, ``tests/fault``): external links, soft links,
virtual and external datasets and hard-link cycles are refused (:func:`_check_safe`); a table's
declared row count and each column's declared size are checked against the bytes the file stores, and
its filters and dtypes against those phasewatch writes (:func:`read_table`,
:func:`_check_declared_size`); the metadata's table declarations and schema mark are checked
(:func:`_check_table_spec`, :func:`check_schema`).  The openers of a segment file and of a segment
inside a packed file live here too.  :mod:`phasewatch.store.reader` composes these into a run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import InvalidArgumentError, RunFormatError, SchemaVersionError
from . import format as fmt
from .hdf5 import has_signature, superblock_eof


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
    """Refuse metadata (a dict or HDF5 attributes) without the phasewatch format mark or of a newer schema."""
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
