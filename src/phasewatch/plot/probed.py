"""The figures of the recorder's curvature and NTK probes: λ_max of the training-loss Hessian
(:func:`sharpness`), the empirical NTK on the fixed probe set (:func:`ntk`) and the criticality Φ
(:func:`criticality`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .common import (
    BEYOND_EDGE_COLOUR,
    CRITICAL_COLOUR,
    MissingDataError,
    _decimate,
    _event_lines,
    _legend_above,
    _log_if_wide,
    _nb,
    _place_legends,
    _shade_codes,
    _single,
    _stack,
    _step_axis,
)
from .style import PALETTE, paper_style


def _curvature(analysis, fig: str, need: Sequence[str], what: str) -> dict[str, np.ndarray]:
    cv = analysis.curvature or {}
    if not len(cv.get("step", [])) or any(c not in cv for c in need) or not all(
            np.isfinite(np.asarray(cv[c], dtype=float)).any() for c in need):
        raise MissingDataError(f"{fig}: the run has no {what}; {_RECORD_HINT[fig]}")
    return cv


_RECORD_HINT = {
    "sharpness": "record Hessian λ_max probes while training, or compute them on stored checkpoints "
                 "with `phasewatch curvature RUN`",
    "ntk": "record NTK probes on a fixed probe set while training, or compute them on stored checkpoints "
           "with `phasewatch curvature RUN`",
    "criticality": "Φ needs C (gradient samples), S (Hessian λ_max) and dρ/dt (NTK probes) recorded at "
                   "the same probes",
}


def _markers(n: int) -> dict:
    return {"marker": "o", "ms": 2.5} if n <= 80 else {}


def sharpness(analysis, ax=None, width: str | float = "text"):
    """λ_max of the training-loss Hessian (Lanczos; error bars = Lanczos residual where recorded)
    against the stability threshold (2/η for SGD; the optimizer-appropriate threshold otherwise, e.g.
    the preconditioned sharpness threshold for Adam), over training.  Probes where λ_max exceeds the
    threshold (S = threshold − λ_max < 0, beyond the edge of stability) are shaded."""
    cv = _curvature(analysis, "sharpness", ("lambda_max", "threshold"), "Hessian λ_max probes")
    st = np.asarray(cv["step"])
    lam = np.asarray(cv["lambda_max"], dtype=float)
    thr = np.asarray(cv["threshold"], dtype=float)
    lr = np.asarray(cv.get("lr", np.full(len(st), np.nan)), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        is_sgd = bool(np.isfinite(lr).all() and np.allclose(thr, 2.0 / lr, rtol=1e-9))
    thr_label = r"$2/\eta$" if is_sgd else "stability threshold"
    with paper_style():
        fig, ax = _single(ax, width, aspect=0.42)
        nb = _nb(fig)
        beyond = np.where(np.isfinite(lam) & np.isfinite(thr), (lam > thr).astype(np.int64), -1)
        if (beyond == 1).any():
            _shade_codes(ax, st, beyond, {1: BEYOND_EDGE_COLOUR}, nb)
        x, y = _decimate(st, thr, nb)
        ax.plot(x, y, color="0.2", ls="--", lw=0.9, label=thr_label)
        res = np.asarray(cv.get("lambda_residual", np.full(len(st), np.nan)), dtype=float)
        if len(st) <= 2 * 100 and np.isfinite(res).any() and np.nanmax(res) > 0:
            ax.errorbar(st, lam, yerr=np.where(np.isfinite(res), res, 0.0), color=PALETTE[0], capsize=0,
                        elinewidth=0.6, label=r"$\lambda_{\max}$ (Lanczos)", **_markers(len(st)))
        else:
            x, y = _decimate(st, lam, nb)
            ax.plot(x, y, color=PALETTE[0], label=r"$\lambda_{\max}$ (Lanczos)", **_markers(len(st)))
        if (beyond == 1).any():
            from matplotlib.patches import Patch

            h, lbl = ax.get_legend_handles_labels()
            h.append(Patch(color=BEYOND_EDGE_COLOUR))
            lbl.append(r"$S < 0$")
        else:
            h, lbl = ax.get_legend_handles_labels()
        _log_if_wide(ax, lam, thr)
        ax.set_ylabel("sharpness")
        _step_axis(ax)
        ax.set_title("sharpness against the stability threshold", loc="left")
        _legend_above(ax, h, lbl, handlelength=2.0)
        _event_lines(ax, analysis)
        _place_legends(fig)
    return fig


def ntk(analysis, ax=None, width: str | float = "text"):
    """The empirical NTK on the fixed probe set: (a) ρ = Σ_k ln λ_k (log-determinant over eigenvalues
    above a relative floor) and (b) its rate dρ/dt per step (finite differences between probes).
    With ``ax=`` only ρ is drawn (into that Axes)."""
    cv = _curvature(analysis, "ntk", ("ntk_rho",), "NTK probes (ntk_rho)")
    st = np.asarray(cv["step"])
    rho = np.asarray(cv["ntk_rho"], dtype=float)
    rate = np.asarray(cv.get("ntk_rate", np.full(len(st), np.nan)), dtype=float)
    two = ax is None and np.isfinite(rate).any()
    with paper_style():
        if two:
            fig, axes = _stack(width, 2, [1.0, 0.9])
        else:
            fig, a0 = _single(ax, width, aspect=0.38)
            axes = [a0]
        nb = _nb(fig)
        x, y = _decimate(st, rho, nb)
        axes[0].plot(x, y, color=PALETTE[0], label=r"$\rho$", **_markers(len(st)))
        axes[0].set_ylabel(r"$\rho$")
        axes[0].set_title(("(a) " if two else "") + r"NTK log-determinant $\rho = \Sigma_k \ln\lambda_k$",
                          loc="left")
        if two:
            ax1 = axes[1]
            x, y = _decimate(st, rate, nb)
            ax1.plot(x, y, color=PALETTE[2], ls="-", label=r"$d\rho/dt$", **_markers(len(st)))
            ax1.axhline(0.0, color="0.5", lw=0.6, ls=":")
            ax1.set_ylabel(r"$d\rho/dt$ (per step)")
            ax1.set_title("(b) rate of change", loc="left")
        for a in axes:
            _event_lines(a, analysis)
        _step_axis(axes[-1])
        _place_legends(fig)
    return fig


def criticality(analysis, ax=None, width: str | float = "text"):
    """Criticality Φ = exp(−[(C−1)²/(2·0.3²) + S²/(2·0.15²) + (r−1)²/(2·0.5²)]) (note 001; r = dρ/dt)
    per probe, with the windows where all three observables are critical (0.8 ≤ C ≤ 1.2, |S| ≤ 0.1,
    |r| > τ) shaded: each such probe covers the interval to the midpoints of its neighbours."""
    from matplotlib.patches import Patch

    cv = _curvature(analysis, "criticality", ("phi",), "criticality Φ")
    st = np.asarray(cv["step"], dtype=float)
    phi = np.asarray(cv["phi"], dtype=float)
    crit = np.asarray(cv.get("all_critical", np.zeros(len(st), bool)), dtype=bool)
    with paper_style():
        fig, ax = _single(ax, width, aspect=0.36)
        nb = _nb(fig)
        handles, labels = [], []
        if crit.any():
            mids = (st[1:] + st[:-1]) / 2 if len(st) > 1 else np.empty(0)
            left = np.r_[st[0], mids]
            right = np.r_[mids, st[-1]]
            if len(st) > nb:
                _shade_codes(ax, st, crit.astype(np.int64), {1: CRITICAL_COLOUR}, nb)
            else:
                i = 0
                while i < len(st):
                    if crit[i]:
                        j = i
                        while j + 1 < len(st) and crit[j + 1]:
                            j += 1
                        lo, hi = left[i], right[j]
                        if hi <= lo:  # a lone probe at the end of the run: a visible sliver
                            lo, hi = lo - 0.5, hi + 0.5
                        ax.axvspan(lo, hi, color=CRITICAL_COLOUR, lw=0, zorder=0)
                        i = j + 1
                    else:
                        i += 1
            handles.append(Patch(color=CRITICAL_COLOUR))
            labels.append("all three critical")
        x, y = _decimate(st, phi, nb)
        (h,) = ax.plot(x, y, color=PALETTE[4], label=r"$\Phi$", **_markers(len(st)))
        handles.insert(0, h)
        labels.insert(0, r"$\Phi$")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(r"$\Phi$")
        _step_axis(ax)
        ax.set_title(r"criticality $\Phi$ of C, S and $d\rho/dt$", loc="left")
        _legend_above(ax, handles, labels)
        _event_lines(ax, analysis)
        _place_legends(fig)
    return fig
