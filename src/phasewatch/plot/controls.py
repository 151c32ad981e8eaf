"""Figures of controllers (:mod:`phasewatch.record.control`): their interventions on a time axis, and a
controller study (runs of one recipe with and without each controller).

Both take analysis results (:class:`~phasewatch.analysis.pipeline.Analysis`, whose
``interventions`` the analyzer reads from the run) and plain per-run summaries, never raw files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .style import LINESTYLES, PALETTE, WIDTHS, paper_style

__all__ = ["RULE_COLOURS", "controller_study", "interventions_overlay", "rule_colour"]

#: One colour per controller rule (Okabe & Ito), used for its marks and its arm in a study.
RULE_COLOURS = {"p_band": PALETTE[0], "c_rule": PALETTE[1], "kramers_escape": PALETTE[2],
                "early_stopping": PALETTE[3]}
_OTHER = [PALETTE[4], PALETTE[5], PALETTE[7]]
NO_CONTROL_COLOUR = "0.25"


def rule_colour(rule: str) -> str:
    """The colour of a rule (a fixed one for the built-in rules, a stable pick otherwise)."""
    if rule in RULE_COLOURS:
        return RULE_COLOURS[rule]
    return _OTHER[sum(map(ord, rule)) % len(_OTHER)]


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def interventions_overlay(ax, analysis, *, y: float = 0.96, lines: bool = True, colour: str | None = None,
                          label: bool = True) -> dict[str, Any]:
    """Mark every intervention of ``analysis`` on ``ax``, whose x axis is the training step.

    A learning-rate change is a triangle at its step (▲ raised, ▼ lowered) at height ``y`` in axes
    coordinates (so the marks never change the y limits), with a faint vertical line if ``lines``; an
    early-stopping decision is a dashed vertical line with a ✕.  Colour by rule (:func:`rule_colour`)
    unless ``colour`` is given.  Several groups changed at one step are marked once.  Returns
    ``{legend label: handle}`` (empty when the run has no interventions), so the caller can add them
    to a legend."""
    iv = getattr(analysis, "interventions", None) or {}
    steps = np.asarray(iv.get("step", []))
    if not steps.size:
        return {}
    trans = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    rules = [_text(r) for r in iv["rule"]]
    params = [_text(p) for p in iv["param"]]
    old = np.asarray(iv["old"], dtype=float)
    new = np.asarray(iv["new"], dtype=float)
    handles: dict[str, Any] = {}
    seen: set[tuple[int, str, str]] = set()
    for rule in dict.fromkeys(rules):
        c = colour or rule_colour(rule)
        idx = [i for i, r in enumerate(rules) if r == rule]
        stops = [i for i in idx if params[i] == "stop"]
        up, down = [], []
        for i in idx:
            if params[i] == "stop":
                continue
            kind = "up" if new[i] > old[i] else "down"
            key = (int(steps[i]), rule, kind)
            if key in seen:
                continue
            seen.add(key)
            (up if kind == "up" else down).append(int(steps[i]))
        lr_steps = sorted(up + down)
        if lines and lr_steps:
            for s in lr_steps:
                ax.axvline(s, color=c, lw=0.4, alpha=0.35, zorder=1)
        name = rule.replace("_", " ")
        if up:
            (h,) = ax.plot(up, [y] * len(up), ls="none", marker="^", ms=3.5, color=c, mec="k", mew=0.3,
                           transform=trans, clip_on=False, zorder=5)
            handles[f"{name}: lr raised"] = h
        if down:
            (h,) = ax.plot(down, [y] * len(down), ls="none", marker="v", ms=3.5, color=c, mec="k", mew=0.3,
                           transform=trans, clip_on=False, zorder=5)
            handles[f"{name}: lr lowered"] = h
        for i in stops:
            ax.axvline(int(steps[i]), color=c, lw=0.9, ls="--", zorder=2)
            (h,) = ax.plot([int(steps[i])], [y], ls="none", marker="X", ms=4.5, color=c, mec="k", mew=0.3,
                           transform=trans, clip_on=False, zorder=5)
            handles[f"{name}: stop"] = h
    if not label:
        return {}
    return handles


def _arm_colour(arm: str, rows: Sequence[Mapping[str, Any]], i: int) -> str:
    for r in rows:
        a = r.get("analysis")
        iv = getattr(a, "interventions", None) or {}
        if len(iv.get("rule", [])):
            return rule_colour(_text(iv["rule"][0]))
    rule = rows[0].get("rule") if rows else None
    if rule:
        return rule_colour(str(rule))
    return NO_CONTROL_COLOUR if i == 0 else _OTHER[i % len(_OTHER)]


def controller_study(runs: Mapping[str, Sequence[Mapping[str, Any]]], width: str | float = "text",
                     metric: str = "test_acc", threshold: float = 0.95):
    """The controller-study figure: (a) ``metric`` against step for every run (one colour per arm,
    one line per seed), (b) steps to grokking per seed (runs that never reached ``threshold``: open
    marker at the right edge; bar: the median of those that did), (c) the learning rate the runs
    trained with (log scale) with each arm's interventions marked (:func:`interventions_overlay`),
    (d) final ``metric`` per seed (✕: a run that diverged).

    ``runs``: arm name -> per-seed records, each a mapping with ``analysis`` (the run's
    :class:`~phasewatch.analysis.pipeline.Analysis`), ``grok_step`` (int or None), ``final_test_acc``,
    ``diverged`` (bool) and optionally ``rule`` (the controller's rule name, for its colour) and
    ``stop_step``.  Returns a Figure."""
    import matplotlib.pyplot as plt

    arms = list(runs)
    w = float(width) if isinstance(width, (int, float)) else WIDTHS.get(width, 5.5)
    colours = {arm: _arm_colour(arm, runs[arm], i) for i, arm in enumerate(arms)}
    max_step = 1
    for arm in arms:
        for r in runs[arm]:
            st = r["analysis"].scalars.get("step", [])
            if len(st):
                max_step = max(max_step, int(st[-1]))
    with paper_style():
        fig, axs = plt.subplots(2, 2, figsize=(w, 0.78 * w), layout="constrained",
                                gridspec_kw={"width_ratios": [1.5, 1.0]})
        (ax, cx), (bx, dx) = axs
        # (a) the metric over training
        for i, arm in enumerate(arms):
            for j, r in enumerate(runs[arm]):
                s, v = (r["analysis"].metrics or {}).get(metric, (np.zeros(0), np.zeros(0)))
                ax.plot(s, v, color=colours[arm], ls=LINESTYLES[i % len(LINESTYLES)], lw=0.8, alpha=0.85,
                        label=arm if j == 0 else None)
        ax.axhline(threshold, color="0.5", lw=0.5, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(0, max_step)
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"(a) {metric.replace('_', ' ')} (one line per seed)", loc="left")
        ax.legend(loc="center right", fontsize=6)
        # (c) the learning rate, with interventions
        positive = True
        for i, arm in enumerate(arms):
            for r in runs[arm]:
                sc = r["analysis"].scalars
                if not len(sc.get("step", [])):
                    continue
                lr = np.asarray(sc["lr"], dtype=float)
                lr = lr[:, 0] if lr.ndim == 2 else lr
                ok = np.isfinite(lr)
                positive &= bool(np.all(lr[ok] > 0))
                bx.step(np.asarray(sc["step"])[ok], lr[ok], where="post", color=colours[arm],
                        ls=LINESTYLES[i % len(LINESTYLES)], lw=0.8, alpha=0.85)
            if runs[arm]:
                interventions_overlay(bx, runs[arm][0]["analysis"], colour=colours[arm], lines=False,
                                      y=0.97 - 0.06 * i)
        if positive:
            bx.set_yscale("log")
        bx.set_xlim(0, max_step)
        bx.set_xlabel("step")
        bx.set_ylabel("learning rate")
        bx.set_title("(c) learning rate; ▲▼✕ interventions (first seed)", loc="left")
        # (b) steps to grokking, (d) final metric, one row per arm
        ypos = {arm: len(arms) - 1 - i for i, arm in enumerate(arms)}
        for arm in arms:
            rows = runs[arm]
            k = len(rows)
            for j, r in enumerate(rows):
                yy = ypos[arm] + (j - (k - 1) / 2) * 0.12
                g = r.get("grok_step")
                if g is not None:
                    cx.plot([g], [yy], marker="o", ms=4, color=colours[arm], mec="k", mew=0.3, ls="none")
                else:
                    cx.plot([max_step], [yy], marker="o", ms=4, mfc="white", mec=colours[arm], mew=0.8, ls="none",
                            clip_on=False)
                fin = r.get("final_test_acc", math.nan)
                div = bool(r.get("diverged"))
                dx.plot([fin], [yy], marker="X" if div else "o", ms=4.5 if div else 4, color=colours[arm],
                        mec="k", mew=0.3, ls="none")
            grok = [r.get("grok_step") for r in rows if r.get("grok_step") is not None]
            if grok:
                cx.plot([float(np.median(grok))] * 2, [ypos[arm] - 0.3, ypos[arm] + 0.3], color=colours[arm], lw=1.2)
        for z in (cx, dx):
            z.set_yticks([ypos[a] for a in arms], arms)
            z.set_ylim(-0.6, len(arms) - 0.4)
        cx.set_xlim(0, max_step * 1.04)
        cx.set_xlabel("step")
        cx.set_title(f"(b) steps to {metric.replace('_', ' ')} ≥ {threshold:g}\n(○ at the right: never)",
                     loc="left")
        dx.set_xlim(-0.03, 1.03)
        dx.set_xlabel(f"final {metric.replace('_', ' ')}")
        dx.set_title("(d) final value (✕ diverged)", loc="left")
    return fig
