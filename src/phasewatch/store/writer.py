"""Writing a run: block-buffered, columnar appends to rotating HDF5 segments in SWMR mode.

:class:`RunWriter` is numpy-level and framework-agnostic: the torch recorder uses it, and so can
any other training framework (JAX, plain numpy) that wants to write the phasewatch run format.

Crash safety: rows are buffered in memory and written in blocks.  A block is written to every
dataset of its table, the file is flushed, then the table's ``committed_rows`` is advanced and the
file flushed again.  A process killed at any moment therefore leaves every row counted in
``committed_rows`` on disk; rows beyond it are ignored by readers.

Faults (issue 8, ``tests/fault``):

- *One writer per run.*  An advisory ``flock`` on ``RUN/writer.lock`` is held while the writer is
  open; a second writer (another recorder, in this process or another) is refused with a one-line
  error.  The kernel drops the lock when the process dies, so a lock file left by a killed writer
  never blocks a resume.
- *Disk full.*  Before each block the free space of the run's file system is checked
  (``os.statvfs``); below ``min_free_bytes`` plus the block's size the writer stops with a one-line
  :class:`RunWriteError` instead of letting HDF5 hit ENOSPC, and leaves the rest of the disk to the
  training (its checkpoints).  A write that fails anyway (quota, file-size limit, another process
  filling the disk) fails at once: the chunk cache is off (``rdcc_nbytes=0``), so HDF5 reports the
  error from the write itself rather than from a later flush, which in HDF5 2.0 can crash the
  process.  Either way the writer stops writing; rows committed before stay readable.
- *Signals.*  The recorder's SIGTERM handler (and the exit handler after a KeyboardInterrupt)
  write what is buffered; block writes and the recorder's bookkeeping are :class:`Critical`
  sections, which hold SIGTERM and SIGINT until they end, so the handler never sees a half-done
  write (rows twice, or lost).
- *fork.*  A child forked while the writer is open (DataLoader workers, ``os.fork``) never writes:
  every method is a no-op outside the process that opened the writer, and the child's copies of
  the file descriptors are pointed at an anonymous scratch file, so that even HDF5's own clean-up
  at the child's exit cannot touch the parent's segment.
- *Power loss* (``fsync``): ``"never"`` relies on the OS page cache (a crash of the process loses
  nothing committed, a power loss may lose what was not yet written back, and may leave the open
  segment unreadable); ``"segment"`` (default) makes every closed segment, its directory entry and
  ``meta.json`` durable; ``"flush"`` also syncs every flush, data before the count that vouches for
  it, so every committed row survives a power loss (cost: see ``benchmarks/soak.py --fsync-cost``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import InvalidArgumentError, PhasewatchError, RunFormatError, SchemaVersionError
from . import format as fmt

try:  # POSIX advisory locks; elsewhere a run is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger("phasewatch")

LOCK_FILE = "writer.lock"
FSYNC_POLICIES = ("never", "segment", "flush")
_NEW_SEGMENT_BYTES = 1 << 20  # room asked for before a segment is created (an empty one is ~100 KiB)


class RunWriteError(PhasewatchError, OSError):
    """Writing the run failed (disk full, file-size limit, read-only directory, I/O error); what
    was committed stays.  Also an :class:`OSError`, which is what it is."""


def write_json_atomic(path: Path, obj: Any, sync_dir: bool = False) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename (``sync_dir``: also
    fsync the directory, so that the rename itself survives a power loss)."""
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
    if sync_dir:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory: nothing more to do
        pass
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _os_reason(e: BaseException) -> str:
    """A short reason for an I/O error, also for HDF5's long, multi-line messages."""
    errno_ = getattr(e, "errno", None)
    m = re.search(r"errno = (\d+)", str(e))
    if m:
        errno_ = int(m.group(1))
    if errno_:
        return f"{os.strerror(errno_)} (errno {errno_})"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return first[:200]


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


def _chunking(ds: h5py.Dataset) -> tuple[int, int, int]:
    """(rows per chunk, chunks per row, bytes per stored chunk) of a column."""
    chunks = ds.chunks or (1, *ds.shape[1:])
    width = int(np.prod(ds.shape[1:], dtype=np.int64))
    per_row = max(1, -(-width // max(1, int(np.prod(chunks[1:], dtype=np.int64)))))
    return max(1, chunks[0]), per_row, int(np.prod(chunks, dtype=np.int64)) * ds.dtype.itemsize + 4


# ------------------------------------------------------------------------------------------------
# one writer per run: an advisory lock that dies with its process


def _lock_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    except (OSError, ValueError, AttributeError):
        return "another process"


class _RunLock:
    """``flock(LOCK_EX)`` on ``RUN/writer.lock``, held while a writer is open.

    The kernel releases it when the holder dies (SIGKILL included), so a stale file blocks nothing.
    A clean release unlinks the file first; an acquirer checks that the file it locked is still the
    one at the path (else a releasing writer removed it meanwhile and it tries again).
    """

    def __init__(self, run: Path):
        self.path = run / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        for attempt in range(50):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunWriteError(
                    f"{self.path.parent}: cannot write the run here ({_os_reason(e)}); "
                    "choose a writable directory"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt < 10:  # a reader probing the lock holds it for microseconds
                    time.sleep(0.02)
                    continue
                raise RunFormatError(
                    f"{self.path.parent}: another recorder is writing this run ({_lock_holder(self.path)}, "
                    f"lock {self.path}); close it first or record into another path"
                ) from None
            except OSError as e:  # no locks on this file system (some NFS set-ups)
                os.close(fd)
                log.warning("phasewatch: %s: cannot lock the run (%s); make sure no other recorder "
                            "writes to it", self.path.parent, _os_reason(e))
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # unlinked by a writer that released it meanwhile: lock the new file
                os.close(fd)
                continue
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode(), 0)
            except OSError:
                pass  # the holder's name is a courtesy
            self.fd = fd
            return
        raise RunFormatError(f"{self.path}: cannot take the run's lock; try again")

    def release(self, unlink: bool = True) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(fd)


def writer_is_live(run: str | os.PathLike) -> bool:
    """True if a writer holds the run directory's lock right now (a probe, never blocks)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(Path(run) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock if it was taken
    return False


# ------------------------------------------------------------------------------------------------
# signals: a handler that closes the run (SIGTERM) must not run in the middle of a write

_DEFERRED = (signal.SIGTERM, signal.SIGINT) if hasattr(signal, "pthread_sigmask") else ()


class Critical:
    """A section that a SIGTERM handler must not interrupt, and that one thread at a time enters.

    Python runs signal handlers between any two bytecodes of the main thread.  The recorder's
    SIGTERM handler closes the run, that is, writes what is buffered: run in the middle of a
    block write or of the recorder's bookkeeping it would write rows twice or lose them (found by
    ``benchmarks/soak.py``).  So inside a section SIGTERM and SIGINT are held back in the calling
    thread (``pthread_sigmask``) and delivered when it ends.  That is not enough when the process
    has other threads (torch has some): the kernel then hands the signal to one of them, and
    Python runs the handler in the main thread at once, inside the section.  Hence also:
    :meth:`active` tells a handler that it interrupted a section (the recorder's SIGTERM handler
    then defers itself to :attr:`after_sections`, run when the outermost section ends), and a
    section left by an exception that is not an ``Exception`` (KeyboardInterrupt, SystemExit) is
    marked :attr:`torn`: its owner then writes nothing more, rather than redo half-done work.
    An RLock keeps a handler in the main thread from racing a training loop in another thread.
    """

    __slots__ = ("_lock", "torn")
    _tls = threading.local()  # per thread: a stack of saved signal masks (sections nest)
    after_sections = None  # set by phasewatch.record.signals: runs a deferred SIGTERM handler

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.torn = False

    @staticmethod
    def active() -> bool:
        """True inside a section in this thread: a signal handler running now interrupted it."""
        return bool(getattr(Critical._tls, "stack", None))

    def __enter__(self) -> Critical:
        # The saved mask lives on a per-entry stack, not in one slot: a handler may run inside
        # __enter__ or __exit__ and open sections of its own; with one slot it would overwrite
        # the mask to restore, and SIGTERM would stay blocked for good (found by soak.py).
        self._lock.acquire()
        stack = Critical._tls.__dict__.setdefault("stack", [])
        stack.append(None)
        try:
            if len(stack) == 1 and _DEFERRED and threading.current_thread() is threading.main_thread():
                stack[-1] = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
            _run_pending_handlers()  # a signal that came just before the block: handled here, not mid-way
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, exc_type=None, *exc: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.torn = True
        stack = Critical._tls.stack
        old = stack.pop()
        self._lock.release()
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held signal is delivered now
        if not stack and Critical.after_sections is not None:
            Critical.after_sections()


def _run_pending_handlers() -> None:
    """Entering a Python function runs the signal handlers that are due (CPython's eval breaker)."""


# ------------------------------------------------------------------------------------------------
# fork: children never write

_live_writers: weakref.WeakSet = weakref.WeakSet()
_live_lock = threading.Lock()


def _scratch_fd() -> int:
    try:
        return os.memfd_create("phasewatch-forked")
    except (AttributeError, OSError):
        fh = tempfile.TemporaryFile()
        return os.dup(fh.fileno())


def _after_fork_in_child() -> None:
    """Point the child's copies of every open writer's descriptors at a scratch file."""
    for w in list(_live_writers):
        try:
            w._disown()
        except Exception:  # noqa: BLE001 - never break a fork
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    fsync:
        ``"never"``, ``"segment"`` (default) or ``"flush"``: what is made durable against a power
        loss (see the module docstring).
    min_free_bytes:
        Stop writing (a :class:`RunWriteError`) rather than leave less free space than this on
        the run's file system (64 MiB; 0: write until the disk is full).
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
        fsync: str = "segment",
        min_free_bytes: int = 64 << 20,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise RunFormatError(f"fsync={fsync!r}: use one of {', '.join(FSYNC_POLICIES)}")
        self.path = Path(path)
        self.tables = {t.name: t for t in tables}
        self.block_rows = int(block_rows)
        self.flush_seconds = float(flush_seconds)
        self.rotate_rows = int(rotate_rows)
        self.rotate_seconds = float(rotate_seconds)
        self.fsync = fsync
        self.min_free_bytes = max(0, int(min_free_bytes))
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in self.tables}
        self._buffered: dict[str, int] = {t: 0 for t in self.tables}
        self._file: h5py.File | None = None
        self._closed = False
        self.failed = False  # a write failed: nothing more is written, committed rows stay
        self._critical = Critical()
        self._pid = os.getpid()
        self._lock = _RunLock(self.path)

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunWriteError(
                f"{self.path}: cannot create the run directory ({_os_reason(e)}); choose a writable path"
            ) from None
        self._lock.acquire()
        try:
            self._start(meta, tables, resume)
        except BaseException:
            self._lock.release()
            raise
        with _live_lock:
            _live_writers.add(self)

    def _start(self, meta: dict, tables: list[fmt.TableSpec], resume: bool) -> None:
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
        self._check_space(_NEW_SEGMENT_BYTES)
        try:
            write_json_atomic(meta_path, self.meta, sync_dir=self.fsync != "never")
        except OSError as e:
            raise RunWriteError(
                f"{meta_path}: cannot write ({_os_reason(e)}); choose a writable directory"
            ) from None
        self._open_segment()

    @staticmethod
    def _read_meta(meta_path: Path) -> dict:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise RunFormatError(
                f"{meta_path}: cannot read run metadata ({_os_reason(e)}); run `phasewatch repair` first"
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

    # -- faults -----------------------------------------------------------------------------
    def _mine(self) -> bool:
        """False in a forked child: it must leave the parent's run alone."""
        return os.getpid() == self._pid

    def _disown(self) -> None:
        """In a forked child: never write, and make HDF5's own clean-up at exit write nowhere."""
        self._pid = -1
        fds = [] if self._lock.fd is None else [self._lock.fd]  # the child's copy would keep the lock
        self._lock.fd = None
        self._sever(fds)

    def _sever(self, extra: list[int] | tuple = ()) -> None:
        """Point the segment's file descriptor (and ``extra`` ones) at an anonymous scratch file.

        After a failed write the file on disk is left as it was, like after a kill (readers handle
        that); closing it normally would make HDF5 write metadata that points past what it could
        write (a file that reads as truncated), or crash.
        """
        fds = list(extra)
        if self._file is not None:
            try:
                fds.append(self._file.id.get_vfd_handle())
            except Exception:  # noqa: BLE001 - closed or not a POSIX file driver
                pass
        if fds:
            scratch = _scratch_fd()
            try:
                for fd in fds:
                    os.dup2(scratch, fd)
            finally:
                os.close(scratch)

    def _check_space(self, need: int) -> None:
        """Refuse to write ``need`` more bytes if that would leave less than the reserve free."""
        if not self.min_free_bytes:
            return
        try:
            st = os.statvfs(self.path)
        except (OSError, AttributeError):
            return
        free = st.f_bavail * st.f_frsize
        if free < need + self.min_free_bytes:
            raise RunWriteError(
                f"{self.path}: disk nearly full ({free / 2**20:.1f} MiB free, the next write needs "
                f"{need / 2**20:.2f} MiB and {self.min_free_bytes / 2**20:.0f} MiB are kept free); "
                "recording stops here, committed rows stay readable: free space and resume"
            )

    def _block_bytes(self, pending: list[str]) -> int:
        """An upper bound on the bytes the pending rows add to the file: whole new chunks (and the
        partly filled last one, in case HDF5 moves it) plus room for metadata."""
        total = 64 << 10
        for t in pending:
            old, n = self._committed[t], self._buffered[t]
            for cr, per_row, chunk_bytes in self._chunking[t]:
                total += (-(-(old + n) // cr) - (-(-old // cr)) + 1) * per_row * chunk_bytes
        return total

    def _failure(self, e: BaseException, what: str) -> RunWriteError:
        self.failed = True
        try:
            self._sever()
        except OSError:
            pass
        where = self.path / fmt.segment_name(self.segment_index) if self._file is not None else self.path
        return RunWriteError(
            f"{where}: {what} failed ({_os_reason(e)}); recording stops here, the rows committed "
            "before stay readable"
        )

    # -- segments ---------------------------------------------------------------------------
    def _open_segment(self) -> None:
        index = self._next_segment
        self._next_segment += 1
        name = self.path / fmt.segment_name(index)
        # Built under a temporary name and renamed once in SWMR mode: until then HDF5 holds an
        # exclusive lock, so a reader listing the run in between would fail on a half-made segment
        # (and a crash in between would leave one behind).
        tmp = name.with_name(name.name + ".new")
        try:
            f = h5py.File(tmp, "w", libver="latest", rdcc_nbytes=0)
        except OSError as e:
            raise RunWriteError(
                f"{tmp}: cannot create a segment ({_os_reason(e)}); choose a writable directory"
            ) from None
        try:
            f.attrs["format"] = fmt.FORMAT_NAME
            f.attrs["schema_version"] = fmt.SCHEMA_VERSION
            f.attrs["segment"] = index
            f.attrs["run_id"] = self.meta["run_id"]
            f.attrs["created"] = time.time()
            f.attrs["meta_json"] = json.dumps(self.meta, sort_keys=True, default=_json_default)
            for spec in self.tables.values():
                create_table(f, spec)
            chunking = {t: [_chunking(f[t][c]) for c in spec.columns] for t, spec in self.tables.items()}
            f.swmr_mode = True
            os.replace(tmp, name)
        except BaseException as e:
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
            tmp.unlink(missing_ok=True)
            if isinstance(e, (OSError, RuntimeError)):
                raise RunWriteError(f"{name}: cannot create a segment ({_os_reason(e)})") from None
            raise
        if self.fsync != "never":
            _fsync_dir(self.path)
        self._file = f
        self._chunking = chunking
        self._committed = {t: 0 for t in self.tables}
        self.segment_index = index
        self._segment_started = time.monotonic()
        self._last_flush = time.monotonic()
        self._segment_rows = 0

    def _close_segment(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        name = self.path / fmt.segment_name(self.segment_index)
        f.close()
        if self.fsync != "never" and not self.failed:
            try:
                _fsync_path(name)
            except OSError as e:
                log.warning("phasewatch: %s: fsync failed (%s)", name, _os_reason(e))

    # -- appending --------------------------------------------------------------------------
    def append(self, table: str, **columns: np.ndarray) -> None:
        """Buffer a batch of rows (every column an array whose first axis is the row)."""
        if not self._mine():
            return
        if self._closed:
            raise RunFormatError(f"{self.path}: the writer is closed")
        if self.failed:
            raise RunWriteError(f"{self.path}: an earlier write failed; the writer writes nothing more")
        spec = self.tables[table]
        if set(columns) != set(spec.columns):
            missing = set(spec.columns) - set(columns)
            extra = set(columns) - set(spec.columns)
            raise InvalidArgumentError(f"table {table!r}: missing columns {sorted(missing)}, unknown {sorted(extra)}")
        n = None
        batch = {}
        for name, col in spec.columns.items():
            a = np.asarray(columns[name], dtype=col.dtype)
            if a.shape[1:] != col.shape:
                a = a.reshape((-1, *col.shape))
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise InvalidArgumentError(f"table {table!r}: columns have different row counts")
            batch[name] = a
        if not n:
            return
        with self._critical:
            self._buffers[table].append(batch)
            self._buffered[table] += n
            if self._buffered[table] >= self.block_rows or (
                time.monotonic() - self._last_flush >= self.flush_seconds
            ):
                self.flush()

    def flush(self, rotate: bool = True) -> None:
        """Write every buffered row, then advance ``committed_rows``, flushing around it; then
        start a new segment if this one is due (``rotate=False``: never)."""
        with self._critical:
            self._flush(rotate)

    def _flush(self, rotate: bool) -> None:
        f = self._file
        if f is None or not self._mine():
            return
        if self._critical.torn:  # a KeyboardInterrupt left a block half-written: write no more
            self.failed = True
        if self.failed:
            raise RunWriteError(f"{self.path}: an earlier write failed; the writer writes nothing more")
        pending = [t for t in self.tables if self._buffered[t]]
        if pending:
            try:
                self._check_space(self._block_bytes(pending))
            except RunWriteError:
                self.failed = True
                raise
            try:
                self._write_block(f, pending)
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise self._failure(e, "writing a block") from None
        self._last_flush = time.monotonic()
        if rotate and self._segment_rows and (
            self._segment_rows >= self.rotate_rows
            or time.monotonic() - self._segment_started >= self.rotate_seconds
        ):
            self.rotate()

    def _write_block(self, f: h5py.File, pending: list[str]) -> None:
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
        f.flush()  # the data reaches the file before the count that vouches for it
        if self.fsync == "flush":
            os.fsync(f.id.get_vfd_handle())
        for t, count in new_counts.items():
            f[t][fmt.COMMITTED][0] = count
            self._committed[t] = count
            self._buffers[t] = []
            self._buffered[t] = 0
        f.flush()
        if self.fsync == "flush":
            os.fsync(f.id.get_vfd_handle())
        self._segment_rows = int(f["steps"][fmt.COMMITTED][0]) if "steps" in f else 0

    def rotate(self) -> None:
        """Close the current segment (after writing what is buffered) and start the next one."""
        if not self._mine():
            return
        with self._critical:
            self._rotate()

    def _rotate(self) -> None:
        self.flush(rotate=False)
        self._close_segment()
        try:
            self._check_space(_NEW_SEGMENT_BYTES)
            self._open_segment()
        except RunWriteError:
            self.failed = True
            raise

    def update_meta(self, **items: Any) -> None:
        """Merge items into ``meta.json`` (atomic rewrite)."""
        if not self._mine():
            return
        self.meta.update(items)
        write_json_atomic(self.path / fmt.META_FILE, self.meta, sync_dir=self.fsync != "never")

    def close(self) -> None:
        """Write what is buffered (unless a write failed), close the segment, release the run."""
        if self._closed or not self._mine():
            return
        with self._critical:
            if self._closed:
                return
            try:
                if not (self.failed or self._critical.torn):
                    self.flush(rotate=False)
            finally:
                self._closed = True
                try:
                    self._close_segment()
                finally:
                    self._lock.release()

    def abandon(self) -> None:
        """Close the file without writing buffers (after a write error); committed rows stay."""
        if not self._mine():
            return
        self._closed = True
        try:
            self._close_segment()
        except Exception:  # noqa: BLE001 - the file may be unusable; nothing more to save
            pass
        finally:
            self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
