"""Figures, one function each, taking analysis results (never raw files)."""

from __future__ import annotations

import numpy as np

from .style import LINESTYLES, PALETTE, WIDTHS, paper_style

REGIME_COLOURS = {0: "#DDEEFF", 1: "#FFE9C7", 2: "#F7D0C7"}
REGIME_NAMES = {0: "plateau", 1: "transition", 2: "forgetting"}
# legends sit above each panel, right-aligned opposite the panel title, so they never cover data
_LEGEND_ABOVE = {"loc": "lower right", "bbox_to_anchor": (1.0, 0.98), "borderaxespad": 0.0,
                 "columnspacing": 1.0, "handletextpad": 0.4}


def _decimate(x: np.ndarray, y: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Min/max envelope per bucket so a long series stays small and keeps its extremes."""
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max_points // 2
    edges = np.linspace(0, n, buckets + 1).astype(int)
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = y[a:b]
        if not np.isfinite(seg).any():
            continue
        i, j = a + int(np.nanargmin(seg)), a + int(np.nanargmax(seg))
        for k in sorted((i, j)):
            xs.append(x[k])
            ys.append(y[k])
    return np.asarray(xs), np.asarray(ys)


def _event_lines(ax, analysis) -> None:
    for e in analysis.events:
        if e.kind == "grokking":
            ax.axvline(e.step, color="0.3", lw=0.7, ls=":", zorder=0)


def _shade_regimes(ax, steps: np.ndarray, regime: np.ndarray) -> None:
    if not len(steps):
        return
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or regime[i] != regime[start]:
            code = int(regime[start])
            if code in REGIME_COLOURS:
                right = steps[i] if i < len(steps) else steps[-1]
                ax.axvspan(steps[start], right, color=REGIME_COLOURS[code], lw=0, zorder=0)
            start = i


def overview(analysis, width: str = "text", n_sigma: int | None = None):
    """The overview: (a) loss and accuracies with the grokking step, (b) σ_j(t) on a log axis,
    (c) k*(t) and the gap ratio, (d) the adiabatic parameter A(t) with its regimes shaded."""
    import matplotlib.pyplot as plt

    t = analysis.table
    steps = t["step"]
    with paper_style():
        w = WIDTHS.get(width, width if isinstance(width, (int, float)) else 5.5)
        fig, axes = plt.subplots(4, 1, figsize=(w, w * 0.95), sharex=True,
                                 gridspec_kw={"height_ratios": [1.1, 1.2, 0.9, 0.9]}, layout="constrained")
        ax = axes[0]
        sc = analysis.scalars
        if len(sc.get("step", [])) and np.isfinite(sc["loss"]).any():
            x, y = _decimate(sc["step"], sc["loss"])
            ax.plot(x, y, color=PALETTE[0], label="train loss")
            ax.set_yscale("log")
            ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        for i, (name, (s, v)) in enumerate(sorted(analysis.metrics.items())):
            if "acc" in name:
                ax2.plot(s, v, color=PALETTE[1 + i % 6], ls=LINESTYLES[1 + i % 6], label=name)
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_ylabel("accuracy")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, **_LEGEND_ABOVE, ncols=3)
        for e in analysis.events:
            if e.kind == "grokking":
                ax.annotate(f"{e.metric} ≥ {e.rule.split('>=')[-1].strip()}\nstep {e.step}",
                            xy=(e.step, 0.5), xycoords=("data", "axes fraction"),
                            xytext=(3, 0), textcoords="offset points", fontsize=6, color="0.3")
        ax.set_title("(a) loss, accuracy", loc="left")

        ax = axes[1]
        sig = t["sigma"]
        n = sig.shape[1] if n_sigma is None else min(n_sigma, sig.shape[1])
        for j in range(n):
            x, y = _decimate(steps, sig[:, j])
            ax.plot(x, y, color=PALETTE[j % len(PALETTE)], ls=LINESTYLES[(j // len(PALETTE)) % 4],
                    lw=0.8, label=f"σ{j + 1}" if j < 3 or j == n - 1 else None)
        ax.set_yscale("log")
        ax.set_ylabel("σ_j of window")
        ax.legend(**_LEGEND_ABOVE, ncols=5, handlelength=1.5)
        ax.set_title(f"(b) σ_j, window W={analysis.window}", loc="left")

        ax = axes[2]
        ax.step(steps, t["kstar"], where="post", color=PALETTE[0], label="k*")
        ax.set_ylabel("k*")
        ax.set_ylim(0, max(2, int(np.nanmax(t["kstar"])) + 1) if len(steps) else 2)
        ax3 = ax.twinx()
        ax3.spines["right"].set_visible(True)
        x, y = _decimate(steps, t["gap_ratio"])
        ax3.plot(x, y, color=PALETTE[3], ls="--", lw=0.8, label="gap ratio σ_k*/σ_k*+1")
        ax3.set_yscale("log")
        ax3.set_ylabel("gap ratio")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, **_LEGEND_ABOVE, ncols=2)
        ax.set_title("(c) gap position", loc="left")

        ax = axes[3]
        _shade_regimes(ax, steps, t["regime"])
        x, y = _decimate(steps, t["A"])
        ax.plot(x, y, color=PALETTE[0], label="canonical")
        x, y = _decimate(steps, t["A_eigen"])
        ax.plot(x, y, color=PALETTE[2], ls="--", lw=0.8, label="eigen")
        ax.set_yscale("log")
        ax.set_ylabel("‖ΔC‖_F / (η g²)")
        ax.set_xlabel("step")
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles += [Patch(color=REGIME_COLOURS[c], label=REGIME_NAMES[c]) for c in (0, 1, 2)]
        ax.legend(handles=handles, **_LEGEND_ABOVE, ncols=5, handlelength=1.5)
        ax.set_title("(d) adiabatic A", loc="left")
        for a in axes:
            _event_lines(a, analysis)
    return fig


PHASE_COLOURS = {"exploration": "#F7D0C7", "transition": "#FFE9C7", "generalization": "#DDF2E6"}


def noise(analysis, width: str = "text"):
    """Gradient noise over training: (a) the consolidation ratio C (canonical, delta-method CI) with
    the learning phases of p = C/(1+C) shaded, when gradient samples were recorded; (b) Hill's α̂ on
    100-step windows of gradient norms with its exact χ² interval, and the α = 2 line above which
    there is no evidence of a stable heavy tail."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pr, ti = analysis.probes, analysis.tail_index
    with paper_style():
        w = WIDTHS.get(width, width if isinstance(width, (int, float)) else 5.5)
        fig, axes = plt.subplots(2, 1, figsize=(w, w * 0.6), sharex=True, layout="constrained")
        ax = axes[0]
        if pr and len(pr.get("step", [])):
            st = pr["step"]
            for i, ph in enumerate(pr["phase"]):
                lo = st[i - 1] if i else st[0]
                hi = st[i]
                if ph in PHASE_COLOURS and hi > lo:
                    ax.axvspan(lo, hi, color=PHASE_COLOURS[ph], lw=0, zorder=0)
            ax.fill_between(st, pr["C_lo"], pr["C_hi"], color=PALETTE[0], alpha=0.25, lw=0, label="95% CI")
            ax.plot(st, pr["C"], color=PALETTE[0], marker="o", ms=2, label="C (canonical)")
            ax.plot(st, pr["C_naive"], color=PALETTE[3], ls="--", lw=0.8, label="C naive")
            ax.axhline(1.0, color="0.4", lw=0.6, ls=":")
            ax.set_yscale("log")
            handles, _ = ax.get_legend_handles_labels()
            handles += [Patch(color=c, label=n) for n, c in PHASE_COLOURS.items()]
            ax.legend(handles=handles, **_LEGEND_ABOVE, ncols=3, handlelength=1.5)
        else:
            ax.text(0.5, 0.5, "no gradient samples recorded\n(Recorder(grad_samples_every=...))",
                    transform=ax.transAxes, ha="center", va="center", fontsize=7, color="0.4")
        ax.set_ylabel("C = signal / noise")
        ax.set_title("(a) consolidation ratio", loc="left")
        ax = axes[1]
        if ti and len(ti.get("step", [])):
            x, lo, hi = ti["step"], ti["alpha_lo"], ti["alpha_hi"]
            ax.fill_between(x, lo, hi, color=PALETTE[2], alpha=0.25, lw=0, label="95% CI")
            ax.plot(x, ti["alpha"], color=PALETTE[2], label="Hill α̂ (top 10% of 100 grad norms)")
            ax.axhline(2.0, color="0.3", lw=0.7, ls="--", label="α = 2")
            top = float(np.nanmax(hi)) if np.isfinite(hi).any() else 4.0
            if top > 20:  # Hill on light tails runs far above 2: a log axis keeps α = 2 readable
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, max(4.0, top * 1.05))
            ax.legend(**_LEGEND_ABOVE, ncols=3, handlelength=1.5)
        else:
            ax.text(0.5, 0.5, "fewer than 100 steps", transform=ax.transAxes, ha="center", va="center",
                    fontsize=7, color="0.4")
        ax.set_ylabel("tail index α̂")
        ax.set_xlabel("step")
        ax.set_title("(b) heavy tail", loc="left")
        st = analysis.scalars.get("step", [])
        if len(st):
            ax.set_xlim(st[0], st[-1])
        for a in axes:
            _event_lines(a, analysis)
    return fig


FIGURES = {"overview": overview, "noise": noise}
