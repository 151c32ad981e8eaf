"""benchmarks/gpu.py on a machine without CUDA: one line saying it needs CUDA, exit status 0 (so CI
runs the script everywhere; on a CUDA machine it would run the full benchmark, so it is skipped)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would benchmark it")
def test_gpu_benchmark_cpu_fallback(python, child_env):
    env = dict(child_env)
    env["PYTHONPATH"] = str(ROOT / "src") + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([python, str(ROOT / "benchmarks" / "gpu.py")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA device" in lines[0], p.stdout
    assert "Traceback" not in p.stderr
