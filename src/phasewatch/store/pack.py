"""``phasewatch pack`` and ``phasewatch repair``: one self-contained file, and clean segments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import RunFormatError
from . import format as fmt
from .reader import open_run
from .segments import _open_h5, read_table
from .writer import _json_default, write_json_atomic, writer_is_live


def _copy_table(
    dst: h5py.Group, name: str, cols: dict[str, np.ndarray], compression: str | None, level: int | None = None
) -> None:
    g = dst.create_group(name)
    n = len(next(iter(cols.values()))) if cols else 0
    spec = fmt.TableSpec(name, {c: fmt.Column(a.dtype.str, a.shape[1:]) for c, a in cols.items()})
    rows = spec.chunk_rows()  # as the writer: ~256 KiB chunks, a wide row alone in its chunk
    for c, a in cols.items():
        tail = a.shape[1:]
        if len(tail) == 1 and tail[0] > (1 << 22):
            tail = (1 << 22,)  # rows of more than 4 Mi values are split, as by the writer
        chunks = (max(1, min(n, rows)), *tail) if n else None
        g.create_dataset(
            c, data=a, maxshape=(None, *a.shape[1:]), chunks=chunks or True,
            fletcher32=True, compression=compression, compression_opts=level if compression else None,
        )
    g.create_dataset(fmt.COMMITTED, shape=(1,), dtype="i8", data=[n])


def pack_run(src: str | os.PathLike, dst: str | os.PathLike, *, gzip: int | None = None) -> Path:
    """Write a run (directory or packed file) into one self-contained HDF5 file.

    Only committed rows are copied; overlapping rows of resumed segments keep the later ones, as
    the reader does.  ``gzip`` (1-9) compresses every dataset; dense floats barely compress.
    """
    run = open_run(src)
    dst = Path(dst)
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise RunFormatError(f"{dst}: pack output would overwrite its input; choose another -o")
    compression = None if gzip is None else "gzip"
    tmp = dst.with_name(dst.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        f.attrs["format"] = fmt.PACKED_FORMAT_NAME
        f.attrs["schema_version"] = fmt.SCHEMA_VERSION
        f.attrs["meta_json"] = json.dumps(run.meta, sort_keys=True, default=_json_default)
        segs = f.create_group(fmt.PACKED_SEGMENTS)
        g = segs.create_group("000000")
        for tname in run.meta.get("tables", {}):
            cols = run.table(tname)
            _copy_table(g, tname, cols, compression, gzip)
    os.replace(tmp, dst)
    return dst


def _verify_checksums(g: h5py.Group) -> None:
    """Read every chunk of a table's datasets, one chunk at a time: an OSError if a fletcher32
    checksum does not match (a plain metadata walk would not notice a damaged data chunk)."""
    for d in g.values():
        if isinstance(d, h5py.Dataset) and d.chunks is not None and d.size:
            for sl in d.iter_chunks():
                d[sl]


def repair_run(path: str | os.PathLike) -> list[str]:
    """Make every readable segment of a run directory clean; set unreadable ones aside.

    A segment left open by a killed writer keeps a flag that stops plain HDF5 tools from opening
    it, and may hold rows beyond ``committed_rows``.  Each such segment is rewritten with exactly
    its committed rows (temp file + rename); the original is kept as ``*.h5.orig``.  A segment that
    does not open at all is renamed ``*.h5.unreadable`` so readers stop warning about it.  A
    missing ``meta.json`` is restored from the segments.  Every data chunk is read to verify its
    checksum; a segment with a damaged chunk is set aside as unreadable.  Returns one line per
    action.
    """
    p = Path(path)
    if not p.is_dir():
        raise RunFormatError(f"{p}: repair works on a run directory; for a packed file, re-pack the original")
    if writer_is_live(p):
        raise RunFormatError(f"{p}: a recorder is writing this run right now; repair it after the recorder "
                             "closed (or was killed)")
    actions: list[str] = []
    segs = sorted(p.glob(fmt.SEGMENT_GLOB))
    if not segs:
        raise RunFormatError(f"{p}: no segment-*.h5 files; not a phasewatch run")
    meta = None
    if (p / fmt.META_FILE).exists():
        try:
            meta = json.loads((p / fmt.META_FILE).read_text())
        except ValueError:
            meta = None
    for s in segs:
        clean = True
        try:
            with h5py.File(s, "r") as f:  # a plain open fails on a writer's leftover flag
                for t in f:
                    g = f[t]
                    if isinstance(g, h5py.Group) and fmt.COMMITTED in g:
                        c = int(g[fmt.COMMITTED][0])
                        if any(g[d].shape[0] != c for d in g if d != fmt.COMMITTED):
                            clean = False
                        _verify_checksums(g)
        except OSError:
            clean = False
        if clean:
            continue
        try:
            with _open_h5(s) as f:
                attrs = dict(f.attrs)
                tables = {t: read_table(f[t], None, f"{s}:{t}") for t in f if isinstance(f[t], h5py.Group)}
        except (OSError, RunFormatError, KeyError, ValueError) as e:
            bad = s.with_name(s.name + ".unreadable")
            os.replace(s, bad)
            actions.append(f"{s.name}: unreadable ({str(e).splitlines()[0]}); moved to {bad.name}")
            continue
        tmp = s.with_name(s.name + ".tmp")
        with h5py.File(tmp, "w", libver="latest") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            for t, cols in tables.items():
                _copy_table(f, t, cols, None)
        os.replace(s, s.with_name(s.name + ".orig"))
        os.replace(tmp, s)
        rows = ", ".join(f"{t}={len(next(iter(c.values()), []))}" for t, c in tables.items())
        actions.append(f"{s.name}: rewritten with its committed rows ({rows}); original kept as {s.name}.orig")
        if meta is None and "meta_json" in attrs:
            meta = json.loads(attrs["meta_json"])
            write_json_atomic(p / fmt.META_FILE, meta)
            actions.append(f"{fmt.META_FILE}: restored from {s.name}")
    if meta is None:
        for s in sorted(p.glob(fmt.SEGMENT_GLOB), reverse=True):
            try:
                with _open_h5(s) as f:
                    meta = json.loads(f.attrs["meta_json"])
                write_json_atomic(p / fmt.META_FILE, meta)
                actions.append(f"{fmt.META_FILE}: restored from {s.name}")
                break
            except (OSError, KeyError, ValueError):
                continue
    if not actions:
        actions.append("nothing to repair: every segment is clean")
    return actions


__all__ = ["pack_run", "repair_run"]
