"""The framework's claims, tested: run the experiments under ``examples/claims/`` and tabulate them.

Each experiment is a small script ``examples/claims/claim_NN_<name>.py`` exposing
``run(out_dir, quick: bool) -> dict`` with the keys of :data:`RESULT_KEYS`: the claim, its source,
the setup, the verdict (one of :data:`VERDICTS`) with the reason, the numbers behind it and the
path of its figure.  The scripts record runs with :class:`phasewatch.Recorder` and analyse them
with the public API only; this module finds them (:func:`claims_dir`: in the source checkout),
runs them, and writes ``claims.md`` (the table) and ``claims.json``.

    results = run_claims("claims-out", quick=True, only=[2, 3])
    write_table(results, "claims-out")

The helpers below (:func:`grokking_runs`, :func:`result`, :func:`save_figure`) are shared by the
scripts: the grokking runs of claims 2, 3, 4 and 9 are recorded once per configuration and reused.
An experiment that raises is reported as ``inconclusive`` with the error as its reason, so one
broken experiment does not hide the others.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PhasewatchError

__all__ = ["VERDICTS", "REPRODUCTION_VERDICTS", "RESULT_KEYS", "NOT_YET", "claims_dir", "discover", "load_claim",
           "run_claims", "write_table", "merge_previous", "part", "reproduction", "result", "save_figure",
           "cached_runs", "grokking_runs", "GROKKING"]

VERDICTS = ("holds", "fails", "inconclusive")
#: verdicts of a claim run in its source's own protocol (the ``reproduction`` part)
REPRODUCTION_VERDICTS = ("reproduced", "not reproduced", "not feasible here")
RESULT_KEYS = ("claim", "source", "setup", "verdict", "reason", "numbers", "figure")
#: the ``reproduction`` part of a claim not yet run in its source's protocol
NOT_YET = {"setup": None, "verdict": None, "reason": "not yet run in the source's own protocol",
           "numbers": {}, "figure": None}

_NAME = re.compile(r"claim_(\d+)_[A-Za-z0-9_]+\.py$")


def claims_dir(directory: str | Path | None = None) -> Path:
    """The directory of the claim experiments: ``directory`` if given, else ``examples/claims`` of
    the source checkout this package is imported from (the first ancestor of this file holding
    ``pyproject.toml`` and ``examples/claims``: ``pip install -e .`` or ``PYTHONPATH=src``), else
    ``examples/claims`` under the current directory.

    The experiments ship with the source, not with the installed package; when none of these
    exists, a one-line :class:`PhasewatchError` says where it looked and how to point at them."""
    if directory is not None:
        d = Path(directory)
        if not d.is_dir():
            raise PhasewatchError(f"{d}: no such directory of claim experiments; pass the examples/claims "
                                  "directory of a phasewatch source checkout")
        return d
    here = Path(__file__).resolve()
    looked = []
    for root in here.parents:
        if (root / "pyproject.toml").is_file():
            looked.append(root / "examples" / "claims")
            break
    looked.append(Path.cwd() / "examples" / "claims")
    for d in looked:
        if d.is_dir():
            return d
    raise PhasewatchError(f"no claim experiments in {' or '.join(map(str, looked))}: they ship with the source, "
                          "not the installed package; run from a source checkout (git clone, pip install -e .) "
                          "or pass --claims-dir DIR (Python: directory=DIR)")


def discover(directory: str | Path | None = None) -> dict[int, Path]:
    """``{claim number: script path}`` of the ``claim_NN_*.py`` scripts in ``directory``."""
    d = claims_dir(directory)
    out: dict[int, Path] = {}
    for p in sorted(d.glob("claim_*.py")):
        m = _NAME.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def load_claim(path: str | Path):
    """Import one claim script by file path; it must define ``run(out_dir, quick)``."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"phasewatch_claim_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PhasewatchError(f"{path}: cannot import it as a Python module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "run", None)):
        raise PhasewatchError(f"{path}: defines no run(out_dir, quick) function")
    return mod


def part(setup: str, verdict: str, reason: str, numbers: dict[str, Any] | None = None,
         figure: str | Path | None = None, *, verdicts: Sequence[str] = VERDICTS) -> dict[str, Any]:
    """One part of a claim's result (its setup, verdict with the reason, numbers and figure), checked."""
    if verdict not in verdicts:
        raise PhasewatchError(f"verdict {verdict!r}: use one of {', '.join(verdicts)}")
    return {"setup": setup, "verdict": verdict, "reason": reason, "numbers": _jsonable(numbers or {}),
            "figure": None if figure is None else str(figure)}


def reproduction(setup: str, verdict: str, reason: str, numbers: dict[str, Any] | None = None,
                 figure: str | Path | None = None) -> dict[str, Any]:
    """The ``reproduction`` part: the claim in its source's own protocol (model, optimizer, measurement,
    statistic as the source computes it), verdict one of :data:`REPRODUCTION_VERDICTS`."""
    return part(setup, verdict, reason, numbers, figure, verdicts=REPRODUCTION_VERDICTS)


def result(claim: str, source: str, setup: str, verdict: str, reason: str,
           numbers: dict[str, Any] | None = None, figure: str | Path | None = None, *,
           reproduction: dict[str, Any] | None = None) -> dict[str, Any]:
    """A claim's result dict, checked (verdict one of :data:`VERDICTS`).

    ``setup`` … ``figure`` describe the ``beyond`` part: our own setups (other seeds, tasks,
    optimizers, the bias-corrected estimators, the nulls), verdict holds / fails / inconclusive;
    they stay at the top level too, for readers of older tables.  ``reproduction`` (from
    :func:`reproduction`) is the claim run in its source's protocol; without it the table says that
    it has not been run yet.
    """
    beyond = part(setup, verdict, reason, numbers, figure)
    return {"claim": claim, "source": source, **beyond, "beyond": dict(beyond),
            "reproduction": dict(reproduction) if reproduction is not None else dict(NOT_YET)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy scalars
        x = x.item()
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def save_figure(fig, out_dir: str | Path, name: str = "figure") -> Path:
    """Save ``fig`` as ``out_dir/name.png`` (and ``.pdf``) with the package's style; returns the png."""
    import matplotlib.pyplot as plt

    from ..plot.style import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    save(fig, png, "png")
    save(fig, out_dir / f"{name}.pdf", "pdf")
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------- #
# shared grokking runs (claims 2, 3, 4, 9)
# --------------------------------------------------------------------------------------------- #
#: The grokking demo configurations: full and quick.  Width 512 (not the demo's 2048) keeps a run
#: to ~1 min on a loaded 2-core CPU; the model still groks at step ~180 with weight decay; 450 steps
#: leave ~250 steps after grokking for the lock-in of claim 3 (quick:
#: width 128, one seed, ~15 s a run; it groks at step ~210).
GROKKING = {
    False: {"p": 71, "width": 512, "steps": 450, "lr": 1e-3, "seeds": [0, 1, 2], "weight_decay": 2e-4,
            "grad_samples_every": 10, "grad_probe": 64},
    True: {"p": 71, "width": 128, "steps": 250, "lr": 1e-3, "seeds": [0], "weight_decay": 2e-4,
           "grad_samples_every": 10, "grad_probe": 32},
}


def cached_runs(out_dir: str | Path, name: str, cfg: dict[str, Any], train,
                groups: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Record (or reuse) the runs of one configuration: every seed of ``cfg["seeds"]`` in every
    group; by default two groups, with weight decay ``cfg["weight_decay"]`` and without.

    Runs live in ``out_dir/../_runs/<name>-<hash of cfg>/<group>-seed<N>``, so the claims that
    share them record them once; a run counts as done when its ``.summary.json`` exists.
    ``train(path, seed=, **groups[group])`` records one and returns its summary dict (default
    groups: ``{"wd": {"weight_decay": cfg["weight_decay"]}, "nowd": {"weight_decay": 0.0}}``).
    Returns one dict per run: ``path``, ``group``, ``seed``, the group's keyword arguments
    (``weight_decay``, ...) and the summary (``grok_step``, ...).
    """
    import shutil

    blob = cfg if groups is None else {"cfg": cfg, "groups": groups}
    if groups is None:
        groups = {"wd": {"weight_decay": cfg["weight_decay"]}, "nowd": {"weight_decay": 0.0}}
    key = hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:8]
    base = Path(out_dir).resolve().parent / "_runs" / f"{name}-{key}"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(cfg, indent=1))
    runs = []
    for group, kwargs in groups.items():
        for seed in cfg["seeds"]:
            path = base / f"{group}-seed{seed}"
            done = path.with_suffix(".summary.json")
            if done.exists() and (path / "meta.json").exists():
                summary = json.loads(done.read_text())
            else:
                if path.exists():
                    shutil.rmtree(path)
                summary = train(path, seed=seed, **kwargs)
                done.write_text(json.dumps(summary))
            runs.append({"path": path, "group": group, "seed": seed, **kwargs, **summary})
    return runs


def grokking_runs(out_dir: str | Path, quick: bool) -> list[dict[str, Any]]:
    """Record (or reuse) the grokking demo runs (:data:`GROKKING`): every seed with weight decay and
    without, cached as :func:`cached_runs` says."""
    from .demo import train_grokking

    cfg = dict(GROKKING[bool(quick)])

    def train(path, weight_decay, seed):
        return train_grokking(path, p=cfg["p"], width=cfg["width"], steps=cfg["steps"], lr=cfg["lr"],
                              weight_decay=weight_decay, seed=seed, grad_samples_every=cfg["grad_samples_every"],
                              grad_probe=cfg["grad_probe"])

    return cached_runs(out_dir, "grokking", cfg, train)


def grokking_setup(quick: bool) -> str:
    c = GROKKING[bool(quick)]
    return (f"demo model (x W)^2 V on (a+b) mod {c['p']}, width {c['width']}, Adam lr {c['lr']:g}, "
            f"{c['steps']} steps, {len(c['seeds'])} seed(s) with weight decay {c['weight_decay']:g} and "
            f"{len(c['seeds'])} without; C from {c['grad_probe']} per-example gradients every "
            f"{c['grad_samples_every']} steps")


# --------------------------------------------------------------------------------------------- #
# running and tabulating
# --------------------------------------------------------------------------------------------- #
class _TorchThreads:
    """Set torch's intra-op threads for the duration (restored after); a no-op without torch."""

    def __init__(self, n: int | None) -> None:
        self.n, self.before = n, None

    def __enter__(self):
        if self.n:
            try:
                import torch
            except ImportError:
                return self
            self.before = torch.get_num_threads()
            torch.set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)


def run_claims(out: str | Path, quick: bool = False, only: Sequence[int] | None = None,
               directory: str | Path | None = None, log=print, threads: int | None = 1) -> list[dict[str, Any]]:
    """Run the claim experiments (all, or those numbered in ``only``) into ``out/claim_NN``.

    ``threads``: torch threads while they run (default 1: the models are CPU-sized, and on a
    2-core machine torch's spinning threads made a grokking run 5x slower in wall time, 23 s
    against 122 s, with the same result; None leaves torch's setting alone).

    Returns their result dicts, each with ``number`` and ``seconds`` added; an experiment that raises
    becomes ``inconclusive`` with the error as the reason (its traceback in ``out/claim_NN/error.txt``).
    """
    found = discover(directory)
    if only:
        missing = sorted(set(only) - set(found))
        if missing:
            raise PhasewatchError(f"--only {','.join(map(str, missing))}: no such claim experiment; "
                                  f"available: {', '.join(map(str, sorted(found)))}")
        found = {n: p for n, p in found.items() if n in set(only)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n, path in sorted(found.items()):
        cdir = out / f"claim_{n:02d}"
        cdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            mod = load_claim(path)
            with _TorchThreads(threads):
                res = mod.run(cdir, quick)
            bad = [k for k in RESULT_KEYS if k not in res]
            if bad or res.get("verdict") not in VERDICTS:
                raise PhasewatchError(f"{path.name}: run() returned keys {sorted(res)} / verdict "
                                      f"{res.get('verdict')!r}; needs {', '.join(RESULT_KEYS)}")
        except Exception as e:  # an experiment's failure is a row of the table, not a crash
            (cdir / "error.txt").write_text(traceback.format_exc())
            doc = (getattr(locals().get("mod"), "__doc__", None) or path.stem).strip().splitlines()[0]
            res = result(doc, "", "", "inconclusive", f"the experiment raised {type(e).__name__}: {e}")
        res = dict(res)
        res["number"] = n
        res["seconds"] = round(time.perf_counter() - t0, 1)
        for d in (res, res.get("beyond") or {}, res.get("reproduction") or {}):
            if d.get("figure"):
                d["figure"] = _relative(d["figure"], out)
        results.append(res)
        if log:
            rep = res.get("reproduction") or NOT_YET
            log(f"claim {n} ({res['seconds']:.0f} s): reproduction {rep['verdict'] or 'not yet run'}: "
                f"{rep['reason']}; beyond: {res['verdict']}: {res['reason']}")
    return results


def _relative(figure: str, out: Path) -> str:
    """A figure's path relative to the table's directory, where it lies inside it."""
    fig = Path(figure).resolve()
    return str(fig.relative_to(out.resolve())) if fig.is_relative_to(out.resolve()) else str(fig)


def merge_previous(results: Sequence[dict[str, Any]], out: str | Path, quick: bool) -> list[dict[str, Any]]:
    """``results`` plus the rows of ``out/claims.json`` (same mode) for claims not in ``results``."""
    js = Path(out) / "claims.json"
    if not js.exists():
        return list(results)
    try:
        old = json.loads(js.read_text())
    except (OSError, ValueError):
        return list(results)
    if bool(old.get("quick")) != bool(quick):
        return list(results)
    new = {r["number"] for r in results}
    kept = [r for r in old.get("claims", []) if r.get("number") not in new]
    return sorted([*kept, *results], key=lambda r: r.get("number", 0))


def _cell(s: Any) -> str:
    return str(s if s is not None else "–").replace("|", "\\|").replace("\n", " ")


def _fig(d: dict[str, Any]) -> str:
    return f"[{Path(d['figure']).name}]({d['figure']})" if d.get("figure") else "–"


def _verdict(d: dict[str, Any]) -> str:
    return f"**{d['verdict']}**: {_cell(d['reason'])}" if d.get("verdict") else f"– ({_cell(d.get('reason'))})"


def to_markdown(results: Sequence[dict[str, Any]], quick: bool = False) -> str:
    """The claims table (Markdown): per claim its source, then two parts, each with its setup, figure
    and verdict: ``reproduction`` (the source's own protocol: reproduced / not reproduced / not
    feasible here) and ``beyond`` (our setups, seeds and nulls: holds / fails / inconclusive)."""
    lines = ["# The framework's claims, tested", "",
             f"Mode: {'quick (CI-sized: few seeds, small models; verdicts are indicative only)' if quick else 'full'}."
             " Each row is one experiment under `examples/claims/`; `phasewatch claims` reruns them.", "",
             "| # | claim | source | reproduction: setup | figure | reproduction verdict "
             "| beyond: setup | figure | beyond verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rep = r.get("reproduction") or NOT_YET
        bey = r.get("beyond") or r
        lines.append(f"| {r.get('number', '')} | {_cell(r['claim'])} | {_cell(r['source'])} "
                     f"| {_cell(rep.get('setup'))} | {_fig(rep)} | {_verdict(rep)} "
                     f"| {_cell(bey['setup'])} | {_fig(bey)} | {_verdict(bey)} |")
    return "\n".join(lines) + "\n"


def write_table(results: Sequence[dict[str, Any]], out: str | Path, quick: bool = False) -> tuple[Path, Path]:
    """Write ``out/claims.md`` and ``out/claims.json``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "claims.md"
    md.write_text(to_markdown(results, quick))
    js = out / "claims.json"
    js.write_text(json.dumps({"quick": bool(quick), "claims": _jsonable(list(results))}, indent=1))
    return md, js
