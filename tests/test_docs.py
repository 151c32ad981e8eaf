"""The documentation builds and the tutorial notebook runs (the docs extra: pip install -e .[docs]).

The notebook is executed top to bottom in a kernel of this interpreter, with this checkout's package
on its path, and must finish without an error and show a figure; the site must build with
``mkdocs build --strict``, so a broken cross-reference or a page left out of the navigation fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "tutorial.ipynb"


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    threads = os.environ.get("PHASEWATCH_TEST_THREADS", "1")
    src = str(ROOT / "src")
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def test_tutorial_notebook_has_no_committed_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the tutorial has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code), \
        "examples/tutorial.ipynb has outputs committed: clear them (jupyter nbconvert --clear-output --inplace)"


def test_tutorial_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    # one more cell, not part of the tutorial: which interpreter and which phasewatch the kernel ran
    nb.cells.append(nbformat.v4.new_code_cell("import sys, phasewatch; print(sys.prefix); print(phasewatch.__file__)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    old = dict(os.environ)
    os.environ.update(_kernel_env())  # the kernel process inherits this environment
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, n_code + 2)), "not every cell ran, in order"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    where = "".join(o.get("text", "") for o in code[-1].outputs if o.output_type == "stream").split()
    # the same environment (a venv's python resolves to the base interpreter, so compare prefixes)
    assert Path(where[0]) == Path(sys.prefix), f"the kernel ran in {where[0]}, not in this environment {sys.prefix}"
    assert Path(where[1]).resolve() == (ROOT / "src" / "phasewatch" / "__init__.py").resolve()
    images = [o for c in code for o in c.outputs
              if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) >= 3, f"the tutorial showed {len(images)} figures; expected overview, spectrum and noise"
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "windows" in text and "k*" in text, "the analysis summary was not printed"
    assert "grokking at step" in text, "the tutorial's run did not grok (its summary has no grokking event)"


def test_getting_started_script_runs(tmp_path):
    """The getting-started page includes this script verbatim: it must record, analyse and plot."""
    out = tmp_path / "first"
    env = _kernel_env()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "getting_started.py"), "--out", str(out)],
                          env=dict(env, MPLBACKEND="Agg"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "k*" in proc.stdout and "null" in proc.stdout, proc.stdout
    png = out / "overview.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_docs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("mkdocs is not installed (pip install -e .[docs])")
    pytest.importorskip("mkdocstrings")
    out = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in ("index.html", "getting-started/index.html", "api/recorder/index.html",
                 "quantities/spectral-edge/index.html", "figures/overview/index.html"):
        assert (out / page).is_file(), f"{page} not built"
    api = (out / "api" / "analysis-tails" / "index.html").read_text()
    assert 'id="phasewatch.analysis.tails.hill"' in api, "the API reference lacks phasewatch.analysis.tails.hill"
