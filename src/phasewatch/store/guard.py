"""The metadata guard: a file's HDF5 metadata is walked in a helper process, with a time limit,
before this process lets HDF5 read it (:func:`_guard_files`; used by :mod:`phasewatch.store.reader`).
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
from pathlib import Path

from .hdf5 import superblock_eof

log = logging.getLogger("phasewatch")

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
