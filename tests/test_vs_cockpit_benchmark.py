"""benchmarks/vs_cockpit.py without Cockpit/BackPACK installed: one line saying how to install them,
exit status 0 (the packages are hidden from the child with a None entry in sys.modules, which makes
importlib.util.find_spec report them missing whether or not they are installed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HIDE = ("import runpy, sys; sys.modules['cockpit'] = sys.modules['backpack'] = None; "
        "sys.argv = ['vs_cockpit.py', '--quick']; runpy.run_path(%r, "
        "run_name='__main__')")


def test_vs_cockpit_without_the_packages(python, child_env):
    env = dict(child_env)
    env["PYTHONPATH"] = str(ROOT / "src") + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    script = str(ROOT / "benchmarks" / "vs_cockpit.py")
    p = subprocess.run([python, "-c", HIDE % script], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "cockpit-for-pytorch" in lines[0], p.stdout
    assert "Traceback" not in p.stderr
