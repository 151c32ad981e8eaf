"""The overview and noise figures, and the panels they stack over the step axis: loss, σ_j(t),
k*(t) with the momentum null, A_dk(t) with its regimes, the consolidation ratio C with its phases and
Hill's α̂ (:func:`overview`, :func:`noise`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..analysis.options import hill_window_of
from ..errors import PhasewatchError
from .common import (
    EVENT_COLOUR,
    PHASE_COLOURS,
    REGIME_COLOURS,
    REGIME_NAMES,
    MissingDataError,
    _decimate,
    _envelope,
    _event_lines,
    _legend_above,
    _log_axis,
    _log_if_wide,
    _nb,
    _place_legends,
    _shade_codes,
    _stack,
    _step_axis,
    _step_limits,
)
from .style import LINESTYLES, PALETTE, paper_style


# ------------------------------------------------------------------------------------------------
# panels
# ------------------------------------------------------------------------------------------------
def _has_loss(a) -> bool:
    sc = a.scalars
    return len(sc.get("step", [])) > 0 and "loss" in sc and bool(np.isfinite(sc["loss"]).any())


def _has_probes(a) -> bool:
    pr = a.probes
    return bool(pr) and len(pr.get("step", [])) > 0 and bool(np.isfinite(pr["C"]).any())


def _has_tail(a) -> bool:
    ti = a.tail_index
    return bool(ti) and len(ti.get("step", [])) > 0 and bool(np.isfinite(ti["alpha"]).any())


def _has_alpha_coord(a) -> bool:
    pr = a.probes
    return bool(pr) and "alpha_coord" in pr and bool(np.isfinite(np.asarray(pr["alpha_coord"], float)).any())


def _panel_loss(ax, a) -> None:
    nb = _nb(ax.figure)
    sc = a.scalars
    handles, labels = [], []
    if _has_loss(a):
        x, y = _decimate(sc["step"], sc["loss"], nb)
        (h,) = ax.plot(x, y, color=PALETTE[0], label="train loss")
        handles.append(h)
        labels.append("train loss")
        if np.nanmin(y) > 0:
            _log_if_wide(ax, y, ratio=10.0)
        ax.set_ylabel("loss")
    # logged losses (val_loss, eval_loss, ...: rec.log) share the loss axis, with markers at their steps
    losses = [(n, sv) for n, sv in sorted(a.metrics.items()) if "loss" in str(n).lower()]
    for i, (name, (s, v)) in enumerate(losses):
        x, y = _decimate(np.asarray(s), np.asarray(v, dtype=float), nb)
        (h,) = ax.plot(x, y, color=PALETTE[(4 + i) % 7], ls=LINESTYLES[(1 + i) % 6], marker="o", ms=1.5,
                       label=str(name))
        handles.append(h)
        labels.append(str(name).replace("_", " "))
        ax.set_ylabel("loss")
    accs = [(n, sv) for n, sv in sorted(a.metrics.items()) if "acc" in str(n).lower()]
    if accs:
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        for i, (name, (s, v)) in enumerate(accs):
            x, y = _decimate(np.asarray(s), np.asarray(v, dtype=float), nb)
            (h,) = ax2.plot(x, y, color=PALETTE[1 + i % 6], ls=LINESTYLES[1 + i % 6], label=str(name))
            handles.append(h)
            labels.append(str(name).replace("_", " "))
        jumps = [e for e in a.events if e.kind == "jump"]
        if jumps:
            (h,) = ax2.plot([e.step for e in jumps], [e.value for e in jumps], ls="none", marker="v", ms=3.5,
                            color=EVENT_COLOUR, zorder=4)
            handles.append(h)
            labels.append("jump")
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_ylabel("accuracy")
    for e in a.events:
        if e.kind == "grokking":
            thr = e.rule.split(">=")[-1].strip()
            ax.annotate(f"{e.metric.replace('_', ' ')} ≥ {thr}\nat step {e.step}", xy=(e.step, 0.5),
                        xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points",
                        fontsize=6, color=EVENT_COLOUR, va="center")
    from .controls import interventions_overlay  # controllers' learning-rate changes, if any

    for lbl, h in interventions_overlay(ax, a).items():
        handles.append(h)
        labels.append(lbl)
    ax.set_title("loss and accuracy", loc="left")
    _legend_above(ax, handles, labels)


def _panel_sigma(ax, a, n_sigma: int | None = None) -> None:
    nb = _nb(ax.figure)
    t = a.table
    sig = t["sigma"]
    n = sig.shape[1] if n_sigma is None else max(1, min(n_sigma, sig.shape[1]))
    import matplotlib as mpl

    # σ_1 ≥ σ_2 ≥ … is an ordered family: one sequential colour map (dark = top mode), monotone in
    # lightness so it survives greyscale and colour-vision deficiencies; σ_1 drawn heavier
    cmap = mpl.colormaps["viridis"]
    for j in range(n):
        x, y = _decimate(t["step"], np.where(t["valid"], sig[:, j], np.nan), nb)
        label = rf"$\sigma_{{{j + 1}}}$" if j in (0, 1, n - 1) else None
        ax.plot(x, y, color=cmap(0.88 * j / max(1, n - 1)), lw=1.1 if j == 0 else 0.7, label=label)
    _log_axis(ax.yaxis)
    ax.set_ylabel(r"$\sigma_j$")
    ax.set_title(f"singular values, W = {a.window}", loc="left")
    _legend_above(ax, handlelength=2.0)


def _panel_kstar(ax, a) -> None:
    nb = _nb(ax.figure)
    t = a.table
    steps = t["step"]
    k = np.where(t["valid"] & (t["kstar"] > 0), t["kstar"], np.nan).astype(float)
    x, y = _decimate(steps, k, nb)
    if len(steps) <= 2 * nb:
        (h1,) = ax.step(x, y, where="post", color=PALETTE[0], label="k*")
    else:
        (h1,) = ax.plot(x, y, color=PALETTE[0], label="k*")
    ax.set_ylabel(r"$k^*$")
    top = int(np.nanmax(k)) if np.isfinite(k).any() else 1
    ax.set_ylim(0.5, max(2, top) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax.yaxis.set_minor_locator(MaxNLocator(integer=True, nbins=20))
    ax3 = ax.twinx()
    ax3.spines["right"].set_visible(True)
    x, y = _decimate(steps, np.where(t["valid"], t["gap_ratio"], np.nan), nb)
    (h2,) = ax3.plot(x, y, color=PALETTE[3], ls="--", lw=0.8)
    handles, labels = [h1, h2], [r"$k^*$", r"$\sigma_{k^*}/\sigma_{k^*+1}$"]
    shown = [y]
    if "gap_ratio_null" in t:  # the momentum null at the observed k*, and its finite-dimension band
        null = np.where(t["valid"], t["gap_ratio_null"], np.nan)
        hi = np.where(t["valid"], t.get("gap_ratio_null_hi", null), np.nan)
        xe, lo_e, hi_e = _envelope(steps, null, hi, nb)
        band = ax3.fill_between(xe, lo_e, hi_e, color="0.6", alpha=0.35, lw=0)
        xn, yn = _decimate(steps, null, nb)
        (h3,) = ax3.plot(xn, yn, color="0.35", ls=":", lw=1.0)
        handles += [h3, band]
        labels += ["momentum null", "null band"]
        shown += [yn, hi_e]
    _log_if_wide(ax3, *shown, ratio=10.0)
    ax3.set_ylabel("gap ratio")
    ax.set_title("gap position and ratio" + (" vs the momentum null" if "gap_ratio_null" in t else ""), loc="left")
    _legend_above(ax, handles, labels, handlelength=2.0)


def _panel_A(ax, a) -> None:
    nb = _nb(ax.figure)
    from matplotlib.patches import Patch

    t = a.table
    steps = t["step"]
    _shade_codes(ax, steps, t["regime"], REGIME_COLOURS, nb)
    dk = "A_dk" in t and a.conventions.get("regime", "on A_dk").startswith("on A_dk")
    if dk:  # regimes are A_dk's (dimensionless); the paper's A (units 1/η) on its own axis
        x, y = _decimate(steps, t["A_dk"], nb)
        ax.plot(x, y, color=PALETTE[0], label=r"$A_{dk}$")
        _log_axis(ax.yaxis)
        ax.set_ylabel(r"$A_{dk}$")
        axA = ax.twinx()
        axA.spines["right"].set_visible(True)
        x, y = _decimate(steps, t["A"], nb)
        (hA,) = axA.plot(x, y, color=PALETTE[2], ls="--", lw=0.8)
        _log_axis(axA.yaxis)
        axA.set_ylabel(r"$A$ (1/$\eta$)")
        handles, labels = ax.get_legend_handles_labels()
        handles.append(hA)
        labels.append(r"$A$ (units 1/$\eta$)")
    else:
        x, y = _decimate(steps, t["A"], nb)
        ax.plot(x, y, color=PALETTE[0], label="canonical")
        x, y = _decimate(steps, t["A_eigen"], nb)
        ax.plot(x, y, color=PALETTE[2], ls="--", lw=0.8, label="eigen")
        _log_axis(ax.yaxis)
        ax.set_ylabel(r"$A$")
        handles, labels = ax.get_legend_handles_labels()
    present = set(np.unique(t["regime"]).tolist())
    for c in (0, 1, 2):
        if c in present:
            handles.append(Patch(color=REGIME_COLOURS[c]))
            labels.append(REGIME_NAMES[c])
    if dk:
        ax.set_title(r"$A_{dk} = \|\Delta C\|_F/(\lambda_{k^*}-\lambda_{k^*+1})$ (regimes shaded)", loc="left")
    else:
        ax.set_title(r"adiabatic $A = \|\Delta C\|_F\,/\,(\eta\, g^2)$", loc="left")
    _legend_above(ax, handles, labels)


def _phase_codes(phases) -> tuple[np.ndarray, dict[int, str]]:
    names = list(PHASE_COLOURS)
    codes = np.array([names.index(p) if p in names else -1 for p in np.asarray(phases).astype(str)], dtype=np.int64)
    return codes, {i: PHASE_COLOURS[n] for i, n in enumerate(names)}


def _panel_C(ax, a) -> None:
    nb = _nb(ax.figure)
    from matplotlib.patches import Patch

    pr = a.probes
    st = np.asarray(pr["step"])
    codes, colours = _phase_codes(pr["phase"])
    _shade_codes(ax, st, codes, colours, nb)
    C, C_lo, C_hi = (np.asarray(pr[k], float) for k in ("C", "C_lo", "C_hi"))
    extra = [np.asarray(pr["C_batch"], float)] if "C_batch" in pr and np.isfinite(pr["C_batch"]).any() else []
    pos = np.concatenate([C_lo, C_hi, C, *extra])
    pos = pos[np.isfinite(pos) & (pos > 0)]
    logy = bool(pos.size and pos.max() / pos.min() > 10)
    zero = np.isfinite(C_hi) & (C <= 0)  # bias-corrected C reported 0 (signal not resolved)
    if logy:  # 0 has no place on a log axis: the line breaks there (the axis masks it), a marker shows
        # the CI's upper end, and a lower end of 0 is drawn a decade below the smallest positive value
        C_lo = np.where(C_lo > 0, C_lo, pos.min() / 10)
    xe, lo, hi = _envelope(st, C_lo, C_hi, nb)
    ax.fill_between(xe, lo, hi, color=PALETTE[0], alpha=0.25, lw=0, label="95% CI")
    x, y = _decimate(st, C, nb)
    few = len(st) <= 60
    ax.plot(x, y, color=PALETTE[0], marker="o" if few else None, ms=2, label="C (canonical)")
    if logy and zero.any():
        ax.plot(st[zero], C_hi[zero], ls="none", marker="v", ms=3, color=PALETTE[0], mfc="none", mew=0.7,
                label=r"$C = 0$: upper end of CI")
    if "C_naive" in pr and np.isfinite(pr["C_naive"]).any():
        x, y = _decimate(st, pr["C_naive"], nb)
        ax.plot(x, y, color=PALETTE[3], ls="--", lw=0.8, label="C naive")
    if extra:  # the training batch's SNR, B·C₁
        cb = np.where(extra[0] > 0, extra[0], np.nan) if logy else extra[0]
        x, y = _decimate(st, cb, nb)
        ax.plot(x, y, color=PALETTE[1], ls="-.", lw=0.9, label=r"$C_B$ (training batch)")
    ax.axhline(1.0, color="0.4", lw=0.6, ls=":", zorder=1)
    if logy:
        _log_axis(ax.yaxis, nonpositive="mask")
    handles, labels = ax.get_legend_handles_labels()
    for i, name in enumerate(PHASE_COLOURS):
        if (codes == i).any():
            handles.append(Patch(color=PHASE_COLOURS[name]))
            labels.append(name)
    ax.set_ylabel(r"$C$")
    ax.set_title("consolidation ratio", loc="left")
    _legend_above(ax, handles, labels)


def _panel_alpha(ax, a) -> None:
    nb = _nb(ax.figure)
    ti = a.tail_index
    hi = np.array([np.nan])
    if _has_tail(a):
        x, lo, hi = _envelope(ti["step"], ti["alpha_lo"], ti["alpha_hi"], nb)
        ax.fill_between(x, lo, hi, color=PALETTE[2], alpha=0.25, lw=0, label="95% CI")
        x, y = _decimate(ti["step"], ti["alpha"], nb)
        ax.plot(x, y, color=PALETTE[2], label=r"Hill $\hat\alpha$")
    if _has_alpha_coord(a):  # pooled Hill of standardised noise coordinates (grad_proj), per measurement
        pr = a.probes
        st, y = np.asarray(pr["step"]), np.asarray(pr["alpha_coord"], float)
        clo, chi = np.asarray(pr["alpha_coord_lo"], float), np.asarray(pr["alpha_coord_hi"], float)
        ok = np.isfinite(y) & np.isfinite(clo) & np.isfinite(chi)
        ax.errorbar(st[ok], y[ok], yerr=[y[ok] - clo[ok], chi[ok] - y[ok]], fmt="s", ms=2.5, lw=0.7, capsize=1.5,
                    color=PALETTE[4], label=r"$\hat\alpha_{\rm coord}$ (95% CI)")
        hi = np.concatenate([np.asarray(hi, float), chi[ok]])
    ax.axhline(2.0, color="0.3", lw=0.7, ls="--", label=r"$\alpha = 2$")
    top = float(np.nanmax(hi)) if np.isfinite(hi).any() else 4.0
    if top > 20:  # Hill on light tails runs far above 2: a log axis keeps α = 2 readable
        _log_axis(ax.yaxis)
    else:
        ax.set_ylim(0, max(4.0, top * 1.05))
    ax.set_ylabel(r"$\hat\alpha$")
    ax.set_title(r"Hill $\hat\alpha$ of gradient norms" if not _has_alpha_coord(a) else
                 r"tail index $\hat\alpha$ (gradient norms; noise coordinates)" if _has_tail(a) else
                 r"tail index $\hat\alpha$ of noise coordinates", loc="left")
    _legend_above(ax, handlelength=1.5)


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
OVERVIEW_PANELS = ("loss", "sigma", "kstar", "A", "C", "alpha")
_PANEL_RATIOS = {"loss": 1.1, "sigma": 1.2, "kstar": 0.9, "A": 1.0, "C": 1.0, "alpha": 0.9}


def overview(analysis, width: str | float = "text", n_sigma: int | None = None,
             panels: Sequence[str] | None = None):
    """The overview of a run, panels stacked over the step axis: loss and accuracies with the
    grokking step and accuracy jumps; σ_j(t) of the update window on a log axis; k*(t) and the gap
    ratio with the momentum null at the observed k* and its band (when the analysis has them); the
    dimensionless A_dk(t) with its regimes shaded and the paper's A (units 1/η) on a second axis
    (runs analysed before A_dk: A canonical and ``eigen`` with A's regimes); and, when
    the run has them, the consolidation ratio C with its 95 % CI and the phases of p = C/(1+C)
    shaded, and Hill's α̂ on gradient norms with its CI.

    ``panels`` picks and orders panels from ``loss, sigma, kstar, A, C, alpha`` (default: all the run
    has data for); ``n_sigma`` limits the number of σ_j drawn.
    """
    import matplotlib.pyplot as plt  # noqa: F401  (pyplot backs the figure)

    have = {"loss": _has_loss(analysis) or bool(analysis.metrics), "sigma": True, "kstar": True, "A": True,
            "C": _has_probes(analysis), "alpha": _has_tail(analysis)}
    if panels is None:
        names = [p for p in OVERVIEW_PANELS if have[p]]
    else:
        names = list(panels)
        bad = [p for p in names if p not in OVERVIEW_PANELS]
        if bad:
            raise PhasewatchError(f"overview panels {bad}: choose from {', '.join(OVERVIEW_PANELS)}")
        missing = [p for p in names if not have[p]]
        if missing:
            raise MissingDataError(f"overview: the run has no data for panel(s) {', '.join(missing)}; "
                                   "C needs gradient samples (Recorder(grad_samples_every=...)), "
                                   f"alpha at least {hill_window_of(analysis)} recorded steps")
    if not len(analysis.table.get("step", [])):
        raise MissingDataError("overview: the analysis has no windows; record at least W steps")
    draw = {"loss": _panel_loss, "sigma": lambda ax, a: _panel_sigma(ax, a, n_sigma), "kstar": _panel_kstar,
            "A": _panel_A, "C": _panel_C, "alpha": _panel_alpha}
    return _panel_stack(analysis, width, [(draw[p], _PANEL_RATIOS[p]) for p in names], letters=True)


def _panel_stack(analysis, width, panels, letters: bool):
    """A column of panels sharing the step axis: ``panels`` = [(draw(ax, analysis), height ratio)];
    ``letters``: prefix the titles (a), (b), ... (always, or only when there are several panels)."""
    with paper_style():
        fig, axes = _stack(width, len(panels), [r for _, r in panels])
        for i, (ax, (draw, _)) in enumerate(zip(axes, panels)):
            draw(ax, analysis)
            if letters or len(panels) > 1:
                ax.set_title(f"({chr(97 + i)}) " + ax.get_title(loc="left"), loc="left")
            _event_lines(ax, analysis)
        _step_limits(axes[-1], analysis)
        _step_axis(axes[-1])
        _place_legends(fig)
    return fig


def noise(analysis, width: str | float = "text"):
    """Gradient noise over training: the consolidation ratio C (canonical, delta-method 95 % CI,
    with the naive variant, the training batch's C_B = B·C₁ when the batch size is known, and the
    phases of p = C/(1+C) shaded) when gradient samples were recorded,
    and Hill's α̂ on 100-step windows of gradient norms with its exact χ² interval and the α = 2 line
    (α̂ > 2: no evidence of a stable heavy tail), and, when projected samples were recorded
    (``grad_proj``), the pooled coordinate tail index α̂_coord of each measurement with its bootstrap
    95 % CI.  Draws the panels the run has data for."""
    names = [p for p, ok in (("C", _has_probes(analysis)),
                             ("alpha", _has_tail(analysis) or _has_alpha_coord(analysis))) if ok]
    if not names:
        raise MissingDataError(f"noise: the run has neither gradient samples nor {hill_window_of(analysis)} "
                               "gradient norms; record "
                               "gradient samples with Recorder(grad_samples_every=...)")
    return _panel_stack(analysis, width, [(_panel_C if p == "C" else _panel_alpha, 1.1) for p in names],
                        letters=False)
