"""``phasewatch watch``: a compact, refreshing summary of a (live) run in the terminal.

:func:`latest` picks the newest value of each headline quantity from an analysis, :func:`render`
formats it in a few lines, and :func:`watch` re-reads the run on an interval (optionally
re-rendering the overview figure).  Only the tail of the run is analysed for the summary (the
last window, the last 100 gradient norms), so a refresh costs the read of the run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..analysis.options import HILL_WINDOW, hill_window_of
from ..errors import PhasewatchError


def _last_finite(steps, values) -> tuple[int | None, float]:
    v = np.asarray(values, dtype=float)
    ok = np.nonzero(np.isfinite(v))[0]
    if not ok.size:
        return None, math.nan
    i = int(ok[-1])
    return int(np.asarray(steps)[i]), float(v[i])


def latest(analysis) -> dict[str, Any]:
    """The newest value of each headline quantity: step, loss, lr, k*, gap ratio, A and its regime
    (the last valid window), C with CI, p, phase and band (the last gradient-sample measurement),
    Hill α with CI, the evaluation metrics, and the events so far."""
    from ..analysis.adiabatic import REGIME_LABELS

    d: dict[str, Any] = {}
    sc = analysis.scalars or {}
    st = np.asarray(sc.get("step", []))
    d["step"] = int(st[-1]) if len(st) else None
    d["loss_step"], d["loss"] = _last_finite(st, sc["loss"]) if "loss" in sc else (None, math.nan)
    lr = np.asarray(sc.get("lr", []), dtype=float)
    d["lr"] = float(lr[-1].ravel()[0]) if len(lr) else math.nan
    t = analysis.table or {}
    d["window"] = analysis.window
    d["window_step"] = None
    for k in ("kstar", "gap_ratio", "A", "A_dk", "gap_excess"):
        d[k] = math.nan
    d["regime"] = d["regime_dk"] = ""
    if len(t.get("step", [])):
        v = np.nonzero(np.asarray(t["valid"], dtype=bool))[0]
        if v.size:
            i = int(v[-1])
            d["window_step"] = int(t["step"][i])
            d["kstar"] = int(t["kstar"][i])
            d["gap_ratio"] = float(t["gap_ratio"][i])
            d["A"] = float(t["A"][i])
            # the regime shown beside A is A's own (the paper's thresholds); A_dk carries the default one
            d["regime"] = REGIME_LABELS.get(int(t["regime_A" if "regime_A" in t else "regime"][i]), "")
            if "A_dk" in t:
                d["A_dk"] = float(t["A_dk"][i])
                d["regime_dk"] = REGIME_LABELS.get(int(t["regime"][i]), "")
            if "gap_excess" in t:
                d["gap_excess"] = float(t["gap_excess"][i])
    pr = analysis.probes or {}
    d["noise_step"] = None
    if len(pr.get("step", [])):
        i = len(pr["step"]) - 1
        d["noise_step"] = int(pr["step"][i])
        for k in ("C", "C_lo", "C_hi", "p", "p_lo", "p_hi", "b"):
            d[k] = float(pr[k][i])
        d["n"] = int(pr["n"][i])
        d["phase"], d["band"] = str(pr["phase"][i]), str(pr["band"][i])
        d["measurements"] = len(pr["step"])
    ti = analysis.tail_index or {}
    d["alpha_step"] = None
    d["hill_window"] = hill_window_of(analysis)
    if len(ti.get("step", [])):
        s, a = _last_finite(ti["step"], ti["alpha"])
        if s is not None:
            i = int(np.nonzero(np.asarray(ti["step"]) == s)[0][-1])
            d["alpha_step"], d["alpha"] = s, a
            d["alpha_lo"], d["alpha_hi"] = float(ti["alpha_lo"][i]), float(ti["alpha_hi"][i])
    d["metrics"] = {name: _last_finite(s, v) for name, (s, v) in (analysis.metrics or {}).items()}
    d["events"] = sorted((e.step, e.kind, e.metric, e.rule) for e in analysis.events)
    iv = getattr(analysis, "interventions", None) or {}  # controllers' changes, when recorded
    d["interventions"] = [
        (int(s), str(r.decode() if isinstance(r, bytes) else r), str(p.decode() if isinstance(p, bytes) else p),
         float(o), float(n))
        for s, r, p, o, n in zip(iv.get("step", []), iv.get("rule", []), iv.get("param", []), iv.get("old", []),
                                 iv.get("new", []))]
    return d


def fmt(x: float, digits: int = 4) -> str:
    """A number in ``digits`` significant digits; ``-`` for NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def render(d: dict[str, Any], *, where: str = "", status: str = "") -> str:
    """The summary lines of :func:`latest`'s dict."""
    head = f"{where}  " if where else ""
    lines = [f"{head}step {d['step'] if d['step'] is not None else '-'}" + (f"  [{status}]" if status else "")]
    lines.append(f"loss       {fmt(d['loss'])}" + (f" (step {d['loss_step']})" if d["loss_step"] not in (None, d["step"]) else "")
                 + f"   lr {fmt(d['lr'], 3)}")
    if d["window_step"] is None:
        lines.append(f"spectrum   - (fewer than W={d['window']} valid updates so far)")
    else:
        lines.append(f"spectrum   k* {d['kstar']}   gap ratio {fmt(d['gap_ratio'])}   "
                     f"A {fmt(d['A'])} ({d['regime']})   "
                     + (f"A_dk {fmt(d['A_dk'], 3)} ({d['regime_dk']})   " if d.get("regime_dk") else "")
                     + (f"null x{fmt(d['gap_excess'], 3)}   " if not math.isnan(d.get("gap_excess", math.nan)) else "")
                     + f"[window W={d['window']} ending at step {d['window_step']}]")
    if d["noise_step"] is None:
        lines.append("C / p      - (no gradient samples recorded; Recorder(grad_samples_every=...))")
    else:
        lines.append(f"C / p      C {fmt(d['C'])} [{fmt(d['C_lo'], 3)}, {fmt(d['C_hi'], 3)}]   p {d['p']:.3f} "
                     f"[{d['p_lo']:.3f}, {d['p_hi']:.3f}]   {d['phase']}, {d['band']}   "
                     f"(step {d['noise_step']}, n={d['n']}, b={fmt(d['b'])}; {d['measurements']} measurements)")
    if d["alpha_step"] is None:
        lines.append(f"alpha      - (fewer than {d.get('hill_window', HILL_WINDOW)} gradient norms)")
    else:
        note = "; > 2: no evidence of a stable heavy tail" if d["alpha"] > 2 else ""
        lines.append(f"alpha      Hill {fmt(d['alpha'], 3)} [{fmt(d['alpha_lo'], 3)}, {fmt(d['alpha_hi'], 3)}] "
                     f"on the last {d.get('hill_window', HILL_WINDOW)} gradient norms{note}")
    if d["metrics"]:
        lines.append("eval       " + "   ".join(f"{k} {fmt(v)}" + (f" (step {s})" if s is not None else "")
                                              for k, (s, v) in d["metrics"].items()))
    ev = d["events"]
    if ev:
        shown = ev[-5:]
        more = f"{len(ev) - len(shown)} earlier; " if len(ev) > len(shown) else ""
        lines.append(f"events     {len(ev)}: {more}" + "; ".join(f"{k} at step {s} ({r})" for s, k, _, r in shown))
    else:
        lines.append("events     none yet")
    ivs = d.get("interventions") or []
    if ivs:
        s, r, p, o, n = ivs[-1]
        lines.append(f"control    {len(ivs)} changes; last at step {s}: {r} {p} {fmt(o)} -> {fmt(n)}")
    return "\n".join(lines)


def summary_once(run_path: str | os.PathLike, window: int = 10, full: bool = False):
    """Open the run, analyse it (its tail only unless ``full``); return ``(run, analysis, dict)``."""
    from ..store import open_run
    from .export import analyze_tail

    run = open_run(run_path)
    if full:
        from ..analysis.pipeline import analyze

        res = analyze(run, window=window)
    else:
        st, bst = run.steps["step"], run.band["step"]
        after = {"window": int(bst[-1]) - 1 if len(bst) else None, "steps": int(st[-1]) - 1 if len(st) else None}
        after = {k: v for k, v in after.items() if v is not None}
        after["tail"] = after.get("steps", np.iinfo("i8").min)
        res = analyze_tail(run, window, after=after)
    return run, res, latest(res)


def _render_figure(res, path: Path) -> None:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plot import FIGURES, save

    fig = FIGURES["overview"](res)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        save(fig, tmp, path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)  # a viewer never sees a half-written file
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def watch(run_path: str | os.PathLike, *, window: int = 10, interval: float = 5.0, once: bool = False,
          figure: str | os.PathLike | None = None, out: TextIO | None = None,
          stop: Callable[[], bool] | None = None, idle_exit: float | None = None,
          clear: bool | None = None) -> str:
    """Print the summary every ``interval`` seconds (clearing the screen on a terminal) until
    ``stop()``, Ctrl-C, the run is closed, or nothing new for ``idle_exit`` seconds; ``once``: print
    it once.  ``figure``: also re-render the overview figure to this path (pdf/png/svg) each time
    (that needs the full analysis).  Returns why it stopped."""
    from ..store.live import run_closed

    out = out or sys.stdout
    if clear is None:
        clear = hasattr(out, "isatty") and out.isatty() and not once
    fig_path = Path(figure) if figure else None
    if fig_path is not None and fig_path.suffix.lower() not in (".pdf", ".png", ".svg"):
        raise PhasewatchError(f"--figure {fig_path}: use a .pdf, .png or .svg path")
    last_step, last_new = None, time.monotonic()
    drawn, drawn_at = None, ""
    closed_before = False
    while True:
        closed_now = run_closed(run_path)
        run, res, d = summary_once(run_path, window, full=fig_path is not None)
        status = "closed" if closed_now else "live"
        text = render(d, where=str(run.path), status=status if not Path(run_path).is_file() else "")
        if fig_path is not None:
            if d["step"] != drawn:  # re-rendered only when the run has grown
                _render_figure(res, fig_path)
                drawn, drawn_at = d["step"], time.strftime("%H:%M:%S")
            text += f"\nfigure     {fig_path} (step {drawn}, drawn {drawn_at})"
        if clear:
            out.write("\x1b[H\x1b[2J")
        elif not once and last_step is not None:
            out.write("\n")
        out.write(text + "\n")
        out.flush()
        if once:
            return "once"
        if d["step"] != last_step:
            last_step, last_new = d["step"], time.monotonic()
        if closed_now and closed_before:
            return "closed"
        closed_before = closed_now
        if idle_exit is not None and time.monotonic() - last_new >= idle_exit:
            return "idle"
        deadline = time.monotonic() + (0.0 if closed_now else interval)
        while time.monotonic() < deadline:
            if stop is not None and stop():
                return "stopped"
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if stop is not None and stop():
            return "stopped"
