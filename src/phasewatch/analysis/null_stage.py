"""The momentum-null stage of :func:`~phasewatch.analysis.pipeline.analyze`: the null of a recorded run
(from its meta), the dimension of its Monte Carlo band, the per-window null columns of a chunk of the
band, and the sentence that reads k* and the gap against it (numerics in :mod:`.nulls`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import gradcov, nulls


def window_null_columns(sub, spec, keep, steps, window, null, dim, draws, level, seed, rel_floor) -> dict[str, np.ndarray]:
    """The momentum-null columns of the windows ``keep`` of a chunk (ending at ``steps``): each
    window's norms are √band[r, 0] of its own W rows, its ρ and d_eff functions of its end step, so a
    window's values depend on its rows only."""
    ends = spec.ends[keep]
    dim = dim(steps) if callable(dim) else dim
    rows = ends[:, None] - (window - 1) + np.arange(window)[None, :]
    norms = np.sqrt(np.maximum(sub[rows, 0], 0.0))
    norms[~np.isfinite(sub[rows, 0]).all(axis=1)] = np.nan
    res = nulls.momentum_null(norms, spec.kstar[keep], spec.ratio[keep], spec.g23[keep], null.rho_at(window, steps),
                              dim=dim, draws=draws, level=level, seed=seed, rel_floor=rel_floor)
    return {"kstar_null": res.kstar_null.astype("i8"), "gap_ratio_null": res.gap_ratio_null,
            "gap_excess": res.gap_excess, "gap_ratio_null_hi": res.gap_ratio_null_hi,
            "gap_excess_hi": res.gap_excess_hi,
            "above_null": res.above_null, "g23_null": res.g23_null, "g23_excess": res.g23_excess}


def run_null(run, null: str | float = "momentum") -> nulls.MomentumNull:
    """The :class:`~phasewatch.analysis.nulls.MomentumNull` of a recorded run, from ``run.meta``
    (optimizer class, the hyper-parameters of param group 0, the recorder's ``stride``); runs written
    before the null existed carry the same meta."""
    opt = run.meta.get("optimizer", {}) or {}
    stride = int(run.meta.get("recorder", {}).get("stride", 1) or 1)
    return nulls.null_from_optimizer(opt.get("class", ""), opt.get("hyper") or opt.get("defaults"),
                                     stride=stride, override=null)


def null_dimension(run):
    """d_eff of the momentum null's Monte Carlo band, and why: the recorded dimension (the model's
    parameters, or the projected dimension) — or, when the run measured gradient noise, per window
    the participation ratio Tr(Σ)²/Tr(Σ²) of the gradient-noise covariance (``cov_eff_rank_corrected``)
    of the latest measurement at or before the window's end (capped at the recorded dimension; the
    recorded dimension before the first).  Causal, so a window's band never changes as the run grows.
    Returns (a number or a function of the window-end steps, a description)."""
    groups = run.meta.get("model", {}).get("groups") or []
    rec_dim = float(sum(int(g.get("dim", 0)) for g in groups)) or float(run.n_params or 0) or math.inf
    why = f"the recorded dimension {rec_dim:g} (isotropic noise: the narrowest band)"
    if "grad_samples" in run.meta.get("tables", {}):
        gs = run.table("grad_samples")
        ok = np.asarray(gs["n"]) >= 2
        if ok.any():
            raw = np.asarray(gradcov.probe_columns(gs)["cov_eff_rank_corrected"], dtype=float)[ok]
            has = np.isfinite(raw) & (raw > 0)
            if not has.any():  # e.g. n = 2 micro-batches: no estimate of Tr(S^2) to correct
                return rec_dim, (f"{why}; the {int(ok.sum())} gradient-noise measurements (n = "
                                 f"{int(np.min(np.asarray(gs['n'])[ok]))}) give no participation ratio")
            ms = np.asarray(gs["step"])[ok]
            pr = np.where(has, np.minimum(raw, rec_dim), rec_dim)

            def dims(steps):
                i = np.searchsorted(ms, np.asarray(steps), side="right") - 1
                return np.where(i >= 0, pr[np.maximum(i, 0)], rec_dim)

            return dims, ("per window the participation ratio Tr(S)^2/Tr(S^2) of the gradient-noise covariance "
                          f"at the latest measurement (median {np.median(pr[has]):.4g} over the {int(has.sum())} of "
                          f"{pr.size} measurements that estimate it; the recorded dimension {rec_dim:g} before the "
                          "first and at the others)")
    return rec_dim, why


def null_summary(t: dict[str, np.ndarray], v: np.ndarray) -> dict[str, Any]:
    """Summary of the momentum-null columns over the valid windows ``v``."""
    ex = np.asarray(t["gap_excess"], dtype=float)[v]
    above = np.asarray(t["above_null"], dtype=bool)[v]
    d: dict[str, Any] = {"above_null_fraction": float(np.mean(above)) if above.size else 0.0}
    if np.isfinite(ex).any():
        d["gap_excess_median"] = float(np.nanmedian(ex))
        d["gap_ratio_null_median"] = float(np.nanmedian(np.asarray(t["gap_ratio_null"], dtype=float)[v]))
        if above.any():
            d["gap_excess_median_above"] = float(np.nanmedian(ex[above]))
            st = np.asarray(t["step"])[v][above]
            d["above_null_steps"] = [int(st[0]), int(st[-1])]
        kn = np.asarray(t["kstar_null"])[v]
        kn = kn[kn > 0]
        if kn.size:
            vals, counts = np.unique(kn, return_counts=True)
            d["kstar_null_mode"] = int(vals[np.argmax(counts)])
    g = np.asarray(t.get("g23_excess", []), dtype=float)
    if g.size and np.isfinite(g[v]).any():
        d["g23_excess_median"] = float(np.nanmedian(g[v]))
    return d


def null_reading(d: dict[str, Any]) -> str:
    """The sentence that reads k* and the gap against the momentum null (from :meth:`Analysis.summary_dict`).

    "at the null" when at most twice the band's false-alarm rate (1 − level: the fraction of windows
    pure noise puts above it) of the windows is above the band, else "above the momentum null by ×N"
    with N the median excess of the windows above it."""
    ex, fr = d["gap_excess_median"], d["above_null_fraction"]
    fa = float(d.get("null_false_alarm", 0.0))
    head = (f"k* and gap ratio: median {d['gap_ratio_null_median']:.3g} from momentum alone "
            + (f"(beta={d['null_beta']:g}, " if "null_beta" in d else "(")
            + f"null k* {d.get('kstar_null_mode', '?')}); ")
    if fr <= 2 * fa:
        return head + (f"at the null: no structure beyond momentum (median excess x{ex:.3g}; {100 * fr:.0f}% of "
                       f"windows above the band, noise alone puts {100 * fa:.0f}% there)")
    lo, hi = d["above_null_steps"]
    return head + (f"above the momentum null by x{d['gap_excess_median_above']:.3g} (median) in {100 * fr:.0f}% "
                   f"of windows (steps {lo}-{hi}); median excess over all windows x{ex:.3g}")
