"""Runs of a sweep side by side: one row of final metrics and diagnostics per run, by an attribute.

    rows, cols = compare_table(["runs/w64", "runs/w128"], by="width")
    print(to_markdown(rows, cols))                       # also to_csv, to_json; `phasewatch compare`

The attribute is read from each run's metadata: first the user's own attributes
(``Recorder(..., meta={"width": 512})`` → ``meta["user"]``), then the optimizer's hyper-parameters
(``lr``, ``weight_decay``, ...), the seeds, the recorder configuration and the model summary; a
dotted path (``optimizer.hyper.lr``, ``user.width``) reads exactly that entry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError

ORDER = 45

_NOT_FOUND = object()


def attribute(meta: dict, name: str) -> Any:
    """The value of attribute ``name`` in a run's metadata (see the module docstring), or raise."""
    if "." in name:
        cur: Any = meta
        for part in name.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                raise PhasewatchError(f"--by {name}: no such entry in the run's metadata; see `phasewatch info RUN`")
        return cur
    for where in (("user",), ("optimizer", "hyper"), ("seeds",), ("recorder",), ("model",)):
        cur = meta
        for part in where:
            cur = cur.get(part, {}) if isinstance(cur, dict) else {}
        if isinstance(cur, dict) and name in cur:
            return cur[name]
    if name == "optimizer":
        return meta.get("optimizer", {}).get("class")
    user = sorted(meta.get("user", {}))
    hyper = sorted(meta.get("optimizer", {}).get("hyper", {}))
    raise PhasewatchError(f"--by {name}: not in the run's metadata (user attributes: {', '.join(user) or 'none'}; "
                          f"optimizer: {', '.join(hyper) or 'none'}); record it with Recorder(..., meta={{'{name}': ...}})")


def _last_finite(v: np.ndarray) -> float:
    a = np.asarray(v, dtype=float)
    ok = np.nonzero(np.isfinite(a))[0]
    return float(a[ok[-1]]) if ok.size else math.nan


def run_row(run: Any, by: str, window: int = 10, analysis: Any = None) -> dict[str, Any]:
    """Final metrics and diagnostics of one run, keyed by column name (numbers; NaN where missing)."""
    from ..analysis.pipeline import analyze
    from ..store import open_run

    r = open_run(run) if not hasattr(run, "meta") else run
    a = analysis if analysis is not None else analyze(r, window=window)
    p = Path(str(r.path))
    row: dict[str, Any] = {"run": p.stem if p.suffix == ".h5" else p.name, by: attribute(r.meta, by)}
    for name, (_, v) in sorted(a.metrics.items()):
        row[f"final_{name}"] = _last_finite(v)
    sc = a.scalars or {}
    if "loss" in sc:
        row["final_loss"] = _last_finite(sc["loss"])
    grok = [e.step for e in a.events if e.kind == "grokking"]
    row["grok_step"] = float(grok[0]) if grok else math.nan
    d = a.summary_dict()
    row["kstar_mode"] = float(d["kstar_mode"]) if d.get("kstar_mode") is not None else math.nan
    row["kstar_changes"] = float(d.get("kstar_changes", math.nan))
    row["gap_ratio_median"] = float(d.get("gap_ratio_median", math.nan))
    row["A_median"] = float(d.get("A_median", math.nan))
    pr = a.probes
    if pr and len(pr.get("step", [])):
        for k in ("C", "p", "C_per_example"):
            row[f"{k}_first"] = float(pr[k][0])
        for k in ("C", "C_lo", "C_hi", "p"):
            row[f"{k}_last"] = float(pr[k][-1])
        row["C_median"] = float(np.nanmedian(pr["C"]))
    row["alpha_median"] = float(d.get("alpha_gradnorm_median", math.nan))
    cv = a.curvature or {}
    if len(cv.get("step", [])) and "S" in cv:
        row["S_last"] = _last_finite(cv["S"])
        if "lambda_max" in cv:
            row["lambda_max_last"] = _last_finite(cv["lambda_max"])
    return row


def compare_table(runs: list[Any], by: str, window: int = 10, *, workers: int | None = 1,
                  failed: list[tuple[str, str]] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (sorted by the attribute) and the union of their columns, ``run`` and ``by`` first.

    The runs are analysed in ``workers`` processes (:func:`phasewatch.analyze_many`).  A run that
    cannot be analysed raises one :class:`PhasewatchError` naming every failure, or, when a list
    is given as ``failed``, is left out and its ``(run, error)`` appended there.
    """
    from .batch import AnalysisFailure, analyze_many, raise_failures

    paths = [i for i, r in enumerate(runs) if not hasattr(r, "meta")]
    analyses: list[Any] = [None] * len(runs)
    for i, a in zip(paths, analyze_many([runs[i] for i in paths], workers=workers, window=window)):
        analyses[i] = a
    if failed is None:
        raise_failures([a for a in analyses if a is not None], total=len(runs))
    rows = []
    for r, a in zip(runs, analyses):
        if isinstance(a, AnalysisFailure):
            failed.append((a.run, a.error))
            continue
        rows.append(run_row(r, by, window, analysis=a))
    if not rows and failed:
        raise PhasewatchError(f"no run could be analysed: {failed[0][1]}")

    def key(row):
        v = row[by]
        return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))

    rows.sort(key=key)
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    return rows, cols


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return "" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def to_markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c, math.nan)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def to_csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def c(x):
        if isinstance(x, float):
            return "" if not math.isfinite(x) else repr(x)
        s = str(x)
        return f'"{s}"' if ("," in s or '"' in s) else s

    return "\n".join([",".join(cols)] + [",".join(c(r.get(k, math.nan)) for k in cols) for r in rows]) + "\n"


def to_json(rows: list[dict[str, Any]], by: str) -> str:
    def j(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return json.dumps({"by": by, "rows": [{k: j(v) for k, v in r.items()} for r in rows]}, indent=1)
