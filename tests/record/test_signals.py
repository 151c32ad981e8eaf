"""SIGTERM during training: the recorder flushes what it buffered, then the signal does what it did."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np

import phasewatch

CHILD = textwrap.dedent("""
    import os, signal, sys, torch, phasewatch
    mode = sys.argv[2]
    if mode == "user":
        def handler(signum, frame):
            print("user handler ran", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, handler)
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    m = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    rec = phasewatch.Recorder(sys.argv[1], m, opt, k=4, block=4, flush_rows=10_000, flush_seconds=1e9)
    x = torch.randn(16, 8)
    for step in range(1, 10**9):
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        rec.loss(loss)
        opt.step()
        if step == 37:
            print("step 37", flush=True)
            signal.pause() if hasattr(signal, "pause") else None
""")


def _run(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = tmp_path / f"run-{mode}"
    p = subprocess.Popen([sys.executable, str(script), str(run), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "step 37"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    return p.returncode, out, run


def test_sigterm_flushes_then_terminates(tmp_path):
    code, _, run = _run(tmp_path, "default")
    assert code == -signal.SIGTERM  # the default action still happens
    r = phasewatch.open_run(run)
    # nothing had reached the disk before the signal (huge flush thresholds): all 37 steps were
    # written by the handler, band rows included
    assert r.steps["step"].tolist() == list(range(1, 38))
    assert len(r.band["step"]) == 37 and np.isfinite(r.band["band"][-1, 0])


def test_sigterm_chains_to_the_frameworks_handler(tmp_path):
    code, out, run = _run(tmp_path, "user")
    assert code == 7 and "user handler ran" in out
    assert phasewatch.open_run(run).steps["step"].tolist() == list(range(1, 38))
