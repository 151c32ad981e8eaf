"""Launching the real multi-process (gloo, CPU) workers of the distributed tests.

A worker script is run once per rank as ``python SCRIPT RANK WORLD OUT [ARGS...]`` with
``MASTER_ADDR``/``MASTER_PORT`` set to a free local port and the test thread count
(``PHASEWATCH_TEST_THREADS``); a rank that hangs (a collective another rank never joins) is killed
when the time is up, so it never outlives the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, out: Path, world: int = 2, timeout: float = 150, args: tuple[str, ...] = ()) -> list[str]:
    """Run ``script`` on ``world`` ranks; assert every rank exits 0; return their stderr texts."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": os.environ.get("PHASEWATCH_TEST_THREADS", "1")}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(out), *args], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * world, errs
    return errs


def reports(out: Path, world: int = 2) -> list[dict]:
    """The ``report-{rank}.json`` each rank wrote into ``out``."""
    return [json.loads((Path(out) / f"report-{r}.json").read_text()) for r in range(world)]
