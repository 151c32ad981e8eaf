"""The public surface: a curated ``phasewatch`` namespace that stays light (no torch, no matplotlib
until asked for), and the command line reachable as ``phasewatch.cli:main`` and ``python -m phasewatch``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import phasewatch

SRC = str(Path(phasewatch.__file__).resolve().parents[1])
PUBLIC = {"Recorder", "analyze", "Analysis", "open_run", "Run", "analyze_many", "AnalysisFailure", "pack_run",
          "repair_run", "plots", "curvature", "PhasewatchError", "InvalidArgumentError", "RunFormatError",
          "SchemaVersionError", "RunTooShortError", "RecorderError", "__version__"}


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_is_light_and_dir_is_curated():
    r = _python(
        "import sys, phasewatch\n"
        "d = dir(phasewatch)\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(d)); print(','.join(heavy) or '-')\n"
        "phasewatch.analyze, phasewatch.open_run, phasewatch.analyze_many\n"  # the analyzer: still no torch
        "print(','.join(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)) or '-')\n")
    assert r.returncode == 0, r.stderr
    names, heavy_at_import, heavy_after_analyzer = r.stdout.splitlines()
    assert set(names.split(",")) == PUBLIC
    assert heavy_at_import == "-", f"importing phasewatch imported {heavy_at_import}"
    assert heavy_after_analyzer == "-", f"the analyzer imported {heavy_after_analyzer}"


def test_every_public_name_resolves():
    from phasewatch.analysis.pipeline import Analysis, analyze
    from phasewatch.record.recorder import Recorder
    from phasewatch.workflows.batch import analyze_many

    assert phasewatch.Recorder is Recorder and phasewatch.analyze is analyze and phasewatch.Analysis is Analysis
    assert phasewatch.analyze_many is analyze_many
    assert phasewatch.plots.overview is not None and phasewatch.curvature.lanczos is not None
    assert issubclass(phasewatch.InvalidArgumentError, ValueError)
    for name in sorted(PUBLIC):
        assert getattr(phasewatch, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        phasewatch.nope  # noqa: B018


def test_cli_entry_points(capsys):
    from phasewatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and phasewatch.__version__ in capsys.readouterr().out
    r = _python("import runpy, sys; sys.argv = ['phasewatch', 'report', '--help']; "
                "runpy.run_module('phasewatch', run_name='__main__')")
    assert r.returncode == 0 and "usage: phasewatch report" in r.stdout, r.stderr
    # --help of every command imports neither torch nor matplotlib (they load when a command runs)
    r = _python("import sys\nfrom phasewatch.cli.main import build_parser\nbuild_parser()\n"
                "print(','.join(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)) or '-')")
    assert r.returncode == 0 and r.stdout.strip() == "-", r.stdout + r.stderr
