"""Whether a run is still being written.

Read from its sessions in ``meta.json``, the writer's lock file, and the newest segment's
superblock flags (:func:`phasewatch.store.hdf5.writer_attached`)."""

from __future__ import annotations

import os
from pathlib import Path

from . import format as fmt
from .hdf5 import writer_attached
from .writer import LOCK_FILE, writer_is_live


def run_closed(path: str | os.PathLike, meta: dict | None = None) -> bool:
    """Whether nobody writes a run any more.

    A packed file: always.  A run directory: when its metadata records that its last session ended
    (``sessions[-1]['ended']`` / ``['closed']``, or a top-level ``closed``); else, when the writer's
    lock file is there, when no writer holds the lock (a writer that crashed releases it too); else
    (runs of writers without a lock file) when the newest segment's superblock shows no writer and
    no new segment is being created (a clean ``close()`` clears the flags; a killed writer leaves
    them set, so such a run never counts as closed: use an idle time-out).
    """
    p = Path(path)
    if p.is_file():
        return True
    sessions = (meta or {}).get("sessions") or []
    last = sessions[-1] if sessions and isinstance(sessions[-1], dict) else {}
    if (meta or {}).get("closed") or last.get("ended") or last.get("closed"):
        return True
    segs = sorted(p.glob(fmt.SEGMENT_GLOB))
    if not segs:
        return False
    if (p / LOCK_FILE).exists():  # the writer's run lock, where the writer has one
        return not writer_is_live(p)
    attached = writer_attached(segs[-1])
    if attached is None or attached:
        return False
    # a rotation closes the old segment before the new one appears under a temporary name
    return not list(p.glob(fmt.SEGMENT_GLOB + ".new")) and sorted(p.glob(fmt.SEGMENT_GLOB))[-1] == segs[-1]
