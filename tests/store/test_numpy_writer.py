"""The framework-agnostic writer used from a numpy training loop (examples/numpy_writer.py): the run
it writes is read and analysed like a recorder's, and its band agrees with its raw updates."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

import phasewatch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "numpy_writer.py"


def _example():
    spec = importlib.util.spec_from_file_location("numpy_writer_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_numpy_writer_run_reads_and_analyses(tmp_path):
    out = _example().record_logistic_regression(tmp_path / "run", steps=60, k=8, eval_every=10, snapshots=True)
    run = phasewatch.open_run(out)
    assert not run.warnings
    steps = run.steps
    assert steps["step"].tolist() == list(range(1, 61))
    # the band against the raw updates: b_t[j] = <u_t, u_{t-j}>, NaN before the first update
    u = run.table("snapshots")["update"]
    band, layer = run.band["band"], run.band["layer_band"]
    for t in range(60):
        for j in range(8):
            if t - j < 0:
                assert np.isnan(band[t, j]) and np.all(np.isnan(layer[t, :, j]))
            else:
                np.testing.assert_allclose(band[t, j], u[t] @ u[t - j], rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(layer[t, 0, j], u[t, :20] @ u[t - j, :20], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(steps["update_norm"] ** 2, band[:, 0], rtol=1e-12)
    # gradient-noise rows: the mean of the per-example gradients is the step's gradient
    gs = run.table("grad_samples")
    assert gs["step"].tolist() == [10, 20, 30, 40, 50, 60] and np.all(gs["n"] == 64) and np.all(gs["b"] == 1)
    np.testing.assert_allclose(gs["mean_sq_norm"], steps["grad_norm"][gs["step"] - 1] ** 2, rtol=1e-12)
    np.testing.assert_allclose(gs["layer_trace"].sum(1), gs["trace"], rtol=1e-12)
    # the analysis reads it like any run; the band and snapshot routes agree
    a = phasewatch.analyze(run, window=6)
    s = phasewatch.analyze(run, window=6, source="snapshots")
    v = a.table["valid"] & s.table["valid"]
    assert v.sum() >= 50
    np.testing.assert_array_equal(a.table["kstar"][v], s.table["kstar"][v])
    np.testing.assert_allclose(a.table["gap_ratio"][v], s.table["gap_ratio"][v], rtol=1e-8)
    assert len(a.probes["C"]) == 6
    acc = run.metrics()["test_acc"][1]
    assert acc[-1] > 0.9  # it learns


def test_numpy_writer_example_runs_without_torch(tmp_path, child_env):
    code = ("import runpy, sys; sys.argv = ['numpy_writer.py', '--out', sys.argv[1], '--steps', '40']; "
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'the numpy writer imported torch'")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=child_env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"run: {tmp_path / 'run'}" in res.stdout and "windows" in res.stdout
