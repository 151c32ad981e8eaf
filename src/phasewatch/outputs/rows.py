"""The flat, step-keyed tables every export writes (:func:`tables`), their merged per-step rows,
and the :class:`Sink` interface the exporters (:mod:`.export`, :mod:`.trackers`) implement."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..analysis.options import HILL_WINDOW

TABLE_ORDER = ("window", "steps", "noise", "tail", "curvature", "eval", "events", "interventions")
# rolling Hill in ``analyze``: gradient norms per window (one constant, in analysis.options)
_HILL_WINDOW = HILL_WINDOW


@dataclass
class Table:
    """One flat table: 1-D columns of equal length, ``step`` first (``events``: also ``step``)."""

    name: str
    columns: dict[str, np.ndarray]
    descriptions: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["step"]) if "step" in self.columns else 0

    def select(self, mask: np.ndarray) -> Table:
        """The rows where ``mask`` is True."""
        return Table(self.name, {k: v[mask] for k, v in self.columns.items()}, self.descriptions)


def _safe(name: str) -> str:
    """A column/tag-safe version of a layer or metric name."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)) or "_"


def _strs(a) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel()], dtype=object)


def _split2d(out: dict[str, np.ndarray], name: str, a: np.ndarray, labels: list[str] | None) -> None:
    a = np.asarray(a)
    for j in range(a.shape[1]):
        lbl = _safe(labels[j]) if labels and j < len(labels) else str(j + 1)
        out[f"{name}_{lbl}"] = a[:, j]


def _conv_of(column: str, conventions: dict[str, str]) -> str:
    key = {"gap_ratio": "gap", "gap": "gap", "g23": "gap", "kstar": "kstar", "kstar_weighted": "kstar",
           "A": "A", "A_eigen": "A", "regime": "regime", "sigma1_over_dcrit": "bbp",
           "sigma1_over_edge": "bbp", "A_dk": "A_dk", "regime_A": "regime", "kstar_null": "null",
           "gap_ratio_null": "null", "gap_excess": "null", "gap_ratio_null_hi": "null", "gap_excess_hi": "null",
           "above_null": "null", "g23_null": "null", "g23_excess": "null"}.get(column)
    if key is None and column.startswith("stability_"):
        key = "stability"
    return conventions.get(key, "") if key else ""


def tables(analysis, layer_names: list[str] | None = None) -> dict[str, Table]:
    """Flat, step-keyed tables of an analysis (see the module docstring); empty tables are left out.

    ``layer_names`` (``Run.layer_names``) names the per-layer columns (``grad_norm_<layer>``,
    ``layer_C_<layer>``); without it they are numbered from 1.
    """
    conv = dict(getattr(analysis, "conventions", {}) or {})
    out: dict[str, Table] = {}

    t = analysis.table
    if t and len(t.get("step", [])):
        cols: dict[str, np.ndarray] = {}
        for k, v in t.items():
            v = np.asarray(v)
            if v.ndim == 1:
                cols[k] = v.astype("i8") if v.dtype.kind == "b" else v
            elif v.ndim == 2:
                _split2d(cols, k, v, None)
        desc = {c: _conv_of(c, conv) for c in cols}
        desc["sigma"] = "singular values sigma_j of the update window X_t (W rows)"
        out["window"] = Table("window", cols, {k: v for k, v in desc.items() if v})

    sc = analysis.scalars
    if sc and len(sc.get("step", [])):
        cols = {"step": np.asarray(sc["step"], dtype="i8")}
        for k in ("wall_time", "loss"):
            if k in sc:
                cols[k] = np.asarray(sc[k], dtype=float)
        lr = sc.get("lr")
        if lr is not None:
            lr = np.asarray(lr, dtype=float)
            if lr.ndim == 2 and lr.shape[1] == 1:
                cols["lr"] = lr[:, 0]
            elif lr.ndim == 2:
                for j in range(lr.shape[1]):
                    cols[f"lr_{j}"] = lr[:, j]
            else:
                cols["lr"] = lr
        for k in ("grad_norm", "update_norm"):
            if k in sc:
                cols[k] = np.asarray(sc[k], dtype=float)
        lg = sc.get("layer_grad_norm")
        if lg is not None and np.asarray(lg).ndim == 2 and np.asarray(lg).shape[1] > 1:
            _split2d(cols, "grad_norm", np.asarray(lg, dtype=float), layer_names)
        if "flags" in sc:
            cols["flags"] = np.asarray(sc["flags"], dtype="i8")
        out["steps"] = Table("steps", cols, {"flags": "bits: 1 loss, 2 gradient, 4 update not finite"})

    pr = getattr(analysis, "probes", None) or {}
    if pr and len(pr.get("step", [])):
        cols = {}
        for k, v in pr.items():
            v = np.asarray(v)
            if v.ndim == 1:
                cols[k] = _strs(v) if v.dtype.kind in "OSU" else v
            elif v.ndim == 2:
                _split2d(cols, k, v, layer_names)
        c = conv.get("C", "")
        out["noise"] = Table("noise", cols, {k: c for k in cols if k not in ("step", "source", "n", "b")})

    ti = getattr(analysis, "tail_index", None) or {}
    if ti and len(ti.get("step", [])):
        cols = {k: np.asarray(v) for k, v in ti.items() if np.asarray(v).ndim == 1}
        out["tail"] = Table("tail", cols, {k: conv.get("alpha", "") for k in cols if k != "step"})

    cu = getattr(analysis, "curvature", None) or {}
    if cu and len(cu.get("step", [])):
        cols = {}
        for k, v in cu.items():
            v = np.asarray(v)
            if v.ndim == 1:
                cols[k] = v.astype("i8") if v.dtype.kind == "b" else (_strs(v) if v.dtype.kind in "OSU" else v)
            elif v.ndim == 2:
                _split2d(cols, k, v, None)
        out["curvature"] = Table("curvature", cols, {k: conv[k] for k in cols if k in conv})

    mets = getattr(analysis, "metrics", None) or {}
    if mets:
        steps, names, values = [], [], []
        for name, (s, v) in mets.items():
            steps.append(np.asarray(s, dtype="i8"))
            names.append(np.full(len(s), name, dtype=object))
            values.append(np.asarray(v, dtype=float))
        s = np.concatenate(steps)
        order = np.argsort(s, kind="stable")
        out["eval"] = Table("eval", {"step": s[order], "name": np.concatenate(names)[order],
                                     "value": np.concatenate(values)[order]})

    ev = sorted(getattr(analysis, "events", None) or [], key=lambda e: e.step)
    if ev:
        out["events"] = Table("events", {
            "step": np.array([e.step for e in ev], dtype="i8"),
            "kind": np.array([e.kind for e in ev], dtype=object),
            "metric": np.array([e.metric for e in ev], dtype=object),
            "value": np.array([e.value for e in ev], dtype=float),
            "rule": np.array([e.rule for e in ev], dtype=object),
        })
    iv = getattr(analysis, "interventions", None) or {}
    if iv and len(iv.get("step", [])):  # controllers' changes (phasewatch.record.control), when the run has them
        cols = {k: (_strs(v) if np.asarray(v).dtype.kind in "OSU" else np.asarray(v))
                for k, v in iv.items() if np.asarray(v).ndim == 1}
        out["interventions"] = Table("interventions", cols)
    return {k: out[k] for k in TABLE_ORDER if k in out}


def sigma_matrix(analysis) -> np.ndarray:
    """The (N, W) singular values of the windows (empty if the analysis has no windows)."""
    t = analysis.table
    if not t or "sigma" not in t:
        return np.empty((0, 0))
    return np.asarray(t["sigma"], dtype=float)


# ------------------------------------------------------------------------------------------------
# merged rows (W&B logs one dict per step)
def _numeric(v: np.ndarray) -> bool:
    return np.asarray(v).dtype.kind in "fiub"


def scalar_series(tabs: dict[str, Table]) -> Iterable[tuple[str, np.ndarray, np.ndarray, str]]:
    """Every numeric series of the tables as ``(tag, steps, values, description)``, finite values only.

    Tags are ``<table>/<column>``; evaluation metrics are ``eval/<name>``; ``wall_time`` and text
    columns are not series.
    """
    for name, t in tabs.items():
        if name in ("events", "interventions"):  # text, not series
            continue
        st = np.asarray(t.columns["step"], dtype="i8")
        if name == "eval":
            names = t.columns["name"]
            for m in dict.fromkeys(names.tolist()):
                sel = (names == m) & np.isfinite(t.columns["value"])
                yield f"eval/{_safe(m)}", st[sel], np.asarray(t.columns["value"], dtype=float)[sel], ""
            continue
        for col, v in t.columns.items():
            if col in ("step", "wall_time") or not _numeric(v):
                continue
            v = np.asarray(v, dtype=float)
            ok = np.isfinite(v)
            yield f"{name}/{col}", st[ok], v[ok], t.descriptions.get(col, "")


def merged_rows(tabs: dict[str, Table]) -> list[tuple[int, dict[str, float]]]:
    """All finite numeric values grouped by step, in increasing step order: ``[(step, {tag: value})]``
    (the shape W&B's ``log(data, step=...)`` needs: one call per step, steps increasing)."""
    rows: dict[int, dict[str, float]] = {}
    for tag, st, v, _ in scalar_series(tabs):
        for s, x in zip(st.tolist(), v.tolist()):
            rows.setdefault(int(s), {})[tag] = float(x)
    return sorted(rows.items())


# ------------------------------------------------------------------------------------------------
# sinks: each takes new rows (tables restricted to rows not written before)
class Sink:
    """An export destination; ``write`` receives only rows not written before."""

    def write(self, tabs: dict[str, Table], sigma: tuple[np.ndarray, np.ndarray] | None,
              conventions: dict[str, str]) -> None:  # pragma: no cover - interface
        """Write the new rows of ``tabs`` (and the windows' σ, and the conventions)."""
        raise NotImplementedError

    def restart(self, step: int) -> None:
        """The run was resumed at ``step`` over rows already written (they are superseded)."""

    def close(self) -> None:
        """Flush and close the destination."""
