"""SIGTERM: flush and close every live recorder, then hand the signal on.

Schedulers (SLURM, Kubernetes, torchrun) stop jobs with SIGTERM.  The first recorder created in the
main thread installs one handler; on SIGTERM it closes every live recorder (writing the steps still
buffered in memory) and then chains to whatever handler was installed before it: a training
framework's own handler is called; Python's default action (terminate) is re-raised so the exit
status still says "killed by SIGTERM"; an ignored signal stays ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import weakref

from ..store.writer import Critical

log = logging.getLogger("phasewatch")

_live: weakref.WeakSet = weakref.WeakSet()
_previous = None
_installed = False


def register(recorder) -> None:
    """Track a live recorder and install the handler once (main thread only; elsewhere a no-op)."""
    global _previous, _installed
    _live.add(recorder)
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        _previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True
    except (ValueError, OSError) as e:  # not allowed here (embedded interpreter ...): harmless
        log.debug("phasewatch: SIGTERM handler not installed (%s)", e)


def unregister(recorder) -> None:
    _live.discard(recorder)


def _on_sigterm(signum, frame) -> None:
    if Critical.active():  # it interrupted a write (see Critical): finish that first, then run
        _deferred.append((signum, frame))
        return
    for rec in list(_live):
        try:
            rec.close()
        except Exception:  # noqa: BLE001 - closing must not stop the signal's own action
            pass
    prev = _previous
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or unknown): restore the default action and deliver the signal again
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


_deferred: list = []


def _run_deferred() -> None:
    while _deferred and threading.current_thread() is threading.main_thread():
        _on_sigterm(*_deferred.pop())


Critical.after_sections = _run_deferred
