"""Concurrency: a reader following a run while another process writes it (across rotations), two
recorders on one run (the second is refused; a lock left by a killed one blocks nothing), and
children forked while a recorder is open (DataLoader workers, os.fork): they never write."""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch
from faultkit import check_band, child_env_for

import phasewatch
from phasewatch.errors import RunFormatError
from phasewatch.store import format as fmt
from phasewatch.store import reader as reader_mod
from phasewatch.store.writer import LOCK_FILE, RunWriter, writer_is_live

K = 6

WRITER_CHILD = textwrap.dedent(f"""
    import os, sys, time, torch, phasewatch
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    rec = phasewatch.Recorder(sys.argv[1], model, opt, k={K}, block=4, flush_rows=8, flush_seconds=0.02,
                              rotate_rows=32)
    print("started", flush=True)
    for i in range(int(sys.argv[2])):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        rec.loss(loss)
        opt.step()
        time.sleep(0.01)
    rec.flush()
    print("holding", rec.step, flush=True)
    time.sleep(600)
""")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _train(rec, model, opt, n, x, y):
    for _ in range(n):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        rec.loss(loss)
        opt.step()


def _readline(proc, timeout=120.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_follow_a_live_run_then_refuse_a_second_recorder_and_resume_after_kill(tmp_path):
    """One child records ~260 steps across 8+ segments while this process follows it; then it
    holds the run open: a second recorder is refused; after SIGKILL its lock file is left behind
    and a resume goes ahead at once."""
    path = tmp_path / "run"
    n_steps = 260
    proc = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(path), str(n_steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env_for())
    try:
        assert _readline(proc).strip() == "started", proc.stderr.read()[-2000:] if proc.poll() else ""
        walks0 = reader_mod.guard_walks
        seen, reads, holding = 0, 0, ""
        while not holding:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                holding = proc.stdout.readline()
                assert holding.startswith("holding"), (holding, proc.stderr.read()[-2000:])
            run = phasewatch.open_run(path)  # a reader in another process, while it writes
            reads += 1
            assert run.warnings == [], run.warnings
            st = run.steps["step"]
            np.testing.assert_array_equal(st, np.arange(1, len(st) + 1))
            assert len(st) >= seen  # committed rows never go away
            seen = len(st)
            check_band(run.band, [1])
        n_segments = len(run.segments)
        assert reads >= 10 and n_segments >= 8 and seen == n_steps
        # the live segment is never walked by the metadata guard, closed ones once each
        assert reader_mod.guard_walks - walks0 <= n_segments - 1

        # the run is held open by the child: a second recorder is refused, in one line
        assert writer_is_live(path)
        model = _model(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with pytest.raises(RunFormatError) as ei:
            phasewatch.Recorder(path, model, opt, k=K, block=4, rotate_rows=32, resume=True)
        msg = str(ei.value)
        assert "\n" not in msg and "another recorder" in msg and f"pid {proc.pid}" in msg
        assert str(path / LOCK_FILE) in msg

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (path / LOCK_FILE).exists() and not writer_is_live(path)  # stale file, no lock
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    t0 = time.monotonic()
    with phasewatch.Recorder(path, model, opt, k=K, block=4, rotate_rows=32, resume=True, strict=True) as rec:
        assert time.monotonic() - t0 < 30
        _train(rec, model, opt, 10, x, y)
    assert not (path / LOCK_FILE).exists()
    run = phasewatch.open_run(path)
    assert run.warnings == []
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, n_steps + 11))
    check_band(run.band, [1, n_steps + 1])


def test_second_recorder_in_the_same_process_is_refused(tmp_path):
    path = tmp_path / "run"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    rec = phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, strict=True)
    _train(rec, model, opt, 12, x, y)
    for kw in ({}, {"resume": True}):
        with pytest.raises(RunFormatError) as ei:
            phasewatch.Recorder(path, model, opt, k=K, block=4, **kw)
        assert "another recorder" in str(ei.value) and f"pid {os.getpid()}" in str(ei.value)
    with pytest.raises(RunFormatError):  # the numpy-level writer too
        RunWriter(path, {}, [fmt.steps_table(1, 1)], resume=True)
    with pytest.raises(RunFormatError, match="writing this run"):  # and repair, which rewrites segments
        phasewatch.repair_run(path)
    _train(rec, model, opt, 12, x, y)  # the first one is unharmed
    rec.close()
    assert phasewatch.open_run(path).steps["step"].tolist() == list(range(1, 25))
    with phasewatch.Recorder(path, model, opt, k=K, block=4, resume=True, strict=True) as rec:
        _train(rec, model, opt, 6, x, y)
    assert phasewatch.open_run(path).steps["step"].tolist() == list(range(1, 31))


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((16,), float(i)), torch.zeros(4)


def _fork(child) -> int:
    """Fork; the child runs ``child()`` and must end itself; pytest never runs on in it."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_forked_children_never_write(tmp_path):
    """DataLoader workers (fork) and plain forks that flush, close, exit normally (Python's and
    HDF5's exit handlers) or die by SIGTERM (the recorder's handler) while the parent holds
    unflushed rows: the run's files do not change, the parent's lock is not kept by a child, and
    the parent finishes a clean run with every step exactly once."""
    path = tmp_path / "run"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    rec = phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, flush_seconds=1e9,
                              strict=True)
    _train(rec, model, opt, 10, x, y)
    rec.flush()
    _train(rec, model, opt, 7, x, y)  # 7 steps buffered in the recorder and the writer, unwritten
    before = _digest(path)

    def worker_init(_):
        rec.flush()  # what a stray handler or a careless callback would do in a worker
        rec.writer.flush()
        rec.close()

    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=8, num_workers=2, worker_init_fn=worker_init,
                                         multiprocessing_context="fork")
    assert sum(float(b[0].sum()) for b in loader) == 16 * sum(range(64))
    assert _digest(path) == before

    def normal_exit():
        atexit._run_exitfuncs()  # Python's exit handlers: the recorder's close
        ctypes.CDLL(None).exit(0)  # the C library's: HDF5 closes (and flushes) its open files

    assert _fork(normal_exit) == 0
    assert _digest(path) == before

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)  # the recorder's handler, then the default action
        time.sleep(5)

    assert _fork(sigterm) == -signal.SIGTERM
    assert _digest(path) == before

    # a child still alive when the parent closes the run does not keep its lock
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        try:
            os.read(r, 1)  # until the parent says so
        finally:
            os._exit(0)
    os.close(r)
    try:
        _train(rec, model, opt, 13, x, y)
        rec.close()
        assert not writer_is_live(path)
        with phasewatch.Recorder(path, model, opt, k=K, block=4, resume=True, strict=True) as rec2:
            _train(rec2, model, opt, 5, x, y)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)

    run = phasewatch.open_run(path)
    assert run.warnings == []
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 36))
    check_band(run.band, [1, 31])
    for seg in sorted(path.glob(fmt.SEGMENT_GLOB)):
        with h5py.File(seg, "r") as f:  # closed cleanly: a plain open works
            for t in ("steps", "band"):
                c = int(f[t][fmt.COMMITTED][0])
                assert all(f[t][d].shape[0] == c for d in f[t] if d != fmt.COMMITTED)
    assert json.loads((path / fmt.META_FILE).read_text())["sessions"][1]["resumed"]


def test_sigterm_that_interrupts_a_write_is_deferred_until_the_write_ends(tmp_path, monkeypatch):
    """When the process has other threads, the kernel may hand SIGTERM to one of them and Python
    runs the handler in the main thread at once, in the middle of a block write.  The handler
    then waits for the end of the write (the outermost critical section), and only then closes
    the run and chains to the previous handler."""
    from phasewatch.record import signals

    path = tmp_path / "run"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    rec = phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=1000, flush_seconds=1e9, strict=True)
    _train(rec, model, opt, 21, x, y)  # nothing written yet
    chained = []
    monkeypatch.setattr(signals, "_previous", lambda signum, frame: chained.append(signum))
    with rec.writer._critical:  # a block write under way
        signals._on_sigterm(signal.SIGTERM, None)
        assert chained == [] and not rec._closed  # deferred
        assert phasewatch.open_run(path).steps["step"].tolist() == []
    assert chained == [signal.SIGTERM] and rec._closed  # ran when the write ended
    run = phasewatch.open_run(path)
    assert run.steps["step"].tolist() == list(range(1, 22)) and run.warnings == []


def test_keyboard_interrupt_in_the_middle_of_a_drain_writes_nothing_twice(tmp_path, monkeypatch):
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; if that is inside the
    recorder's drain (band rows handed to the writer, steps rows not yet), the exit handler's
    close must not drain again: the run keeps every row once."""
    path = tmp_path / "run"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    rec = phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, flush_seconds=1e9, strict=True)
    _train(rec, model, opt, 10, x, y)
    real_append = rec.writer.append

    def append_then_interrupt(table, **cols):
        real_append(table, **cols)
        if table == "band":
            raise KeyboardInterrupt

    monkeypatch.setattr(rec.writer, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(rec, model, opt, 10, x, y)
    monkeypatch.setattr(rec.writer, "append", real_append)
    assert rec._critical.torn
    rec.close()  # what the exit handler does
    run = phasewatch.open_run(path)
    assert run.warnings == []
    st, bs = run.steps["step"], run.band["step"]
    np.testing.assert_array_equal(st, np.arange(1, len(st) + 1))
    np.testing.assert_array_equal(bs, np.arange(1, len(bs) + 1))  # no band row twice
    assert len(bs) >= len(st) >= 8
