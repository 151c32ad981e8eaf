"""``analyze(run)``: compose the pure estimators over a recorded run.

Reads the band from a :class:`~phasewatch.store.Run` (or takes arrays), computes per window the
Gram spectrum, k* (plain and weighted), gap ratio, gap, g₂₃, BBP reference and the adiabatic
parameter (canonical and ``eigen``), and returns an :class:`Analysis` with a per-window table that
exports to CSV, JSON and pandas.  Vectorised over windows and processed in chunks, so memory stays
bounded for long runs; a progress bar shows on a terminal.  A band larger than ``memory_budget``
(or any band, with ``chunk_steps=``) is streamed: read from the run's segments chunk by chunk with
the W rows of overlap its windows need, giving the in-memory result value for value.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError
from . import adiabatic as adia
from . import gram, nulls, stages
from . import noise as nz
from .band_table import CHUNK_WINDOWS, analyze_band, band_table_chunked  # noqa: F401 (public here too)
from .events import Event
from .null_stage import null_dimension, null_reading, null_summary, run_null, window_null_columns  # noqa: F401
from .options import MEMORY_BUDGET, AnalysisOptions, hill_window_of
from .stages import _tail_norms, event_table, noise_table  # noqa: F401 (public here too)
from .table import Table, as_table

log = logging.getLogger("phasewatch")



@dataclass
class Analysis:
    """The result of :func:`analyze`.

    table: per window (indexed by the step at which the window ends) columns: ``step``, ``lr``,
        ``update_norm``, ``kstar``, ``gap_ratio``, ``gap``, ``kstar_weighted``, ``g23``,
        ``sigma1_over_dcrit``, ``sigma1_over_edge``, ``A`` (canonical, units 1/η), ``A_eigen``,
        ``A_dk`` (dimensionless), ``regime`` (on A_dk by default), ``regime_A`` (on A), the momentum
        null's ``kstar_null``, ``gap_ratio_null``, ``gap_excess``, ``gap_ratio_null_hi``,
        ``gap_excess_hi``, ``above_null``, ``g23_null``, ``g23_excess`` (see ``null``),
        ``rotation`` / ``rotation_sin`` (largest principal angle, radians, between the top-k* right
        singular subspaces of the window and the one before it; :mod:`~phasewatch.analysis.rotation`),
        ``valid``, ``sigma`` (N, W) for the singular values and ``stability`` (N, W) for the
        per-mode stability coefficients s_j = 1 − ‖ΔC‖_F²/gap_j² (the paper's "α"; Davis–Kahan).
    scalars: the per-step table of the run (loss, lr, gradient and update norms, flags).
    metrics: evaluation metrics ``{name: (steps, values)}``.
    events: grokking step and accuracy jumps found in the metrics.
    conventions: which definition each column uses.
    probes: per gradient-sample measurement (``noise_table``): C with CI, p, phases, B_simple, ...,
        ``C_langevin`` (with CI), the covariance spectrum ``cov_eff_rank``, ``cov_eff_rank_corrected``
        (and ``cov_top``, ``cov_top_fraction`` when recorded), and with a ``grad_proj`` table
        ``alpha_coord``, ``alpha_coord_lo``, ``alpha_coord_hi`` (:mod:`~phasewatch.analysis.gradcov`).
    tail_index: rolling Hill α on gradient norms: ``step``, ``alpha``, ``alpha_lo``, ``alpha_hi``, and
        the per-step Lévy consolidation ratio ``C_levy`` on the same windows.
    curvature: per curvature probe (empty if the run has none): ``step``, ``lr``, ``lambda_max``,
        ``lambda_residual``, ``hvps``, ``threshold`` (2/η for SGD, the optimizer-appropriate
        threshold otherwise), ``S`` = threshold − λ_max, ``eta_opt``, ``trace``, ``trace_lo``,
        ``trace_hi``, ``ntk_rho`` (log-det of the NTK Gram), ``ntk_rate`` (dρ/dt per step),
        ``phi`` (criticality Φ), ``all_critical`` (bool), ``I`` (intelligence coefficient);
        ``group_lambda`` (probes × layer groups: λ_max of each group's diagonal Hessian block) when
        the run recorded per-group curvature.
    interventions: changes made by controllers during the run (empty if none; :mod:`phasewatch.record.control`):
        ``step`` (after which step), ``rule``, ``param``, ``old``, ``new``, ``note`` (str arrays for text).
    null: the momentum null used (``kind``, ``beta``, ``rho1``, ``dim``, ``draws``, ``level``, ``source``);
        its per-window columns are in ``table`` (``kstar_null``, ``gap_ratio_null``, ``gap_excess``,
        ``gap_ratio_null_hi``, ``gap_excess_hi``, ``above_null``, ``g23_null``, ``g23_excess``).
    layers: with ``analyze(layers=True)``, per layer group (``meta["model"]["groups"]``) the same
        per-window table as ``table``, from that group's band (:mod:`~phasewatch.analysis.layers`).
    options: the :class:`~phasewatch.analysis.options.AnalysisOptions` of the analysis.

    Every table is a :class:`~phasewatch.analysis.table.Table` (named column arrays; ``res.table["kstar"]``,
    ``res.probes.to_dataframe()``, ``res.tail_index.to_csv(path)``); :meth:`tables` lists them all
    and :meth:`to_dataframes` gives them as DataFrames.
    """

    source: str
    window: int
    n_params: int
    table: Table
    scalars: Table
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    events: list[Event] = field(default_factory=list)
    conventions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    probes: Table = field(default_factory=Table)
    tail_index: Table = field(default_factory=Table)
    curvature: Table = field(default_factory=Table)
    interventions: Table = field(default_factory=Table)
    null: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Table] = field(default_factory=dict)
    options: AnalysisOptions | None = None

    def __post_init__(self) -> None:
        # every table one shape (a Table); a lazy run's steps (a LazyTable) stay lazy
        for name, tname in (("table", "window"), ("scalars", "steps"), ("probes", "noise"),
                            ("tail_index", "tail_index"), ("curvature", "curvature"),
                            ("interventions", "interventions")):
            v = getattr(self, name)
            if v is None or isinstance(v, dict):
                setattr(self, name, as_table(v, tname))
        self.layers = {k: as_table(v, k) for k, v in (self.layers or {}).items()}

    def tables(self) -> dict[str, Table]:
        """Every table of the analysis by name: ``window`` (per window), ``steps`` (the scalars),
        ``noise`` (probes), ``tail_index``, ``curvature``, ``events``, ``interventions`` and
        ``layer/<group>`` per layer group (empty tables included)."""
        sc = self.scalars if isinstance(self.scalars, Table) else Table(dict(self.scalars.items()), "steps")
        out = {"window": self.table, "steps": sc, "noise": self.probes, "tail_index": self.tail_index,
               "curvature": self.curvature, "events": event_table(self.events),
               "interventions": self.interventions}
        out.update({f"layer/{k}": v for k, v in self.layers.items()})
        return out

    def to_dataframes(self) -> dict[str, Any]:
        """:meth:`tables` as pandas DataFrames (2-D columns expanded to ``name_1 .. name_m``; needs pandas)."""
        return {k: t.to_dataframe() for k, t in self.tables().items()}

    # -- export -----------------------------------------------------------------------------
    def columns(self) -> dict[str, np.ndarray]:
        """Flat per-window columns (``sigma`` split into ``sigma_1`` … ``sigma_W``)."""
        out = {k: v for k, v in self.table.items() if k not in ("sigma", "stability")}
        for j in range(self.table["sigma"].shape[1]):
            out[f"sigma_{j + 1}"] = self.table["sigma"][:, j]
        for j in range(self.table["stability"].shape[1]):
            out[f"stability_{j + 1}"] = self.table["stability"][:, j]
        return out

    def to_dataframe(self):
        """The per-window table as a pandas DataFrame indexed by step (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - depends on the environment
            raise PhasewatchError("to_dataframe needs pandas: pip install pandas") from None
        return pd.DataFrame(self.columns()).set_index("step")

    def to_csv(self, path: str | Path) -> Path:
        cols = self.columns()
        names = list(cols)
        path = Path(path)
        with open(path, "w") as fh:
            fh.write("# phasewatch analysis; " + "; ".join(f"{k}: {v}" for k, v in self.conventions.items()) + "\n")
            fh.write(",".join(names) + "\n")
            data = np.column_stack([np.asarray(cols[n], dtype=float) for n in names])
            ints = {i for i, n in enumerate(names) if cols[n].dtype.kind in "iub"}
            for row in data:
                fh.write(",".join(
                    (str(int(x)) if i in ints else ("" if math.isnan(x) else repr(float(x))))
                    for i, x in enumerate(row)) + "\n")
        return path

    def layers_to_csv(self, path: str | Path) -> Path:
        """The per-layer tables as one CSV with a ``group`` column (:func:`~phasewatch.analysis.layers.layers_to_csv`)."""
        from .layers import layers_to_csv

        return layers_to_csv(self.layers, path, "; ".join(f"{k}: {self.conventions[k]}" for k in
                                                          ("layers", "rotation") if k in self.conventions))

    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> list:
            a = np.asarray(a)
            if a.dtype.kind == "f":
                return [None if not math.isfinite(x) else float(x) for x in a.ravel().tolist()]
            return a.ravel().tolist()

        return {
            "source": self.source,
            "window": self.window,
            "n_params": self.n_params,
            "conventions": self.conventions,
            "events": [e.__dict__ for e in self.events],
            "warnings": self.warnings,
            "summary": self.summary_dict(),
            "table": {k: clean(v) for k, v in self.columns().items()},
            **({"layers": _layer_summary(self.layers)} if self.layers else {}),
            "probes": {k: (clean(v) if np.asarray(v).dtype.kind in "fiub" else [str(x) for x in v])
                       for k, v in self.probes.items() if np.asarray(v).ndim == 1},
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    # -- summaries --------------------------------------------------------------------------
    def summary_dict(self) -> dict[str, Any]:
        t = self.table
        v = t["valid"]
        d: dict[str, Any] = {"windows": int(v.size), "valid_windows": int(v.sum())}
        if v.any():
            k = t["kstar"][v]
            vals, counts = np.unique(k[k > 0], return_counts=True)
            d["kstar_mode"] = int(vals[np.argmax(counts)]) if vals.size else None
            d["kstar_changes"] = int(np.count_nonzero(np.diff(k) != 0))
            d["gap_ratio_median"] = float(np.nanmedian(t["gap_ratio"][v]))
            if "gap_excess" in t:
                d.update(null_summary(t, v))
                if self.null:
                    d["null_beta"] = self.null["beta"]
                    d["null_false_alarm"] = 1.0 - self.null["level"] if self.null.get("draws") else 0.0
            a = t["A"][v]
            if np.isfinite(a).any():
                d["A_median"] = float(np.nanmedian(a))
                reg = t["regime_A"][v] if "regime_A" in t else t["regime"][v]
                d["A_regime_fraction"] = {
                    name: float(np.mean(reg == code)) for code, name in adia.REGIME_LABELS.items() if code >= 0
                }
            adk = t["A_dk"][v] if "A_dk" in t else np.array([])
            if np.isfinite(adk).any():
                d["A_dk_median"] = float(np.nanmedian(adk))
                reg = t["regime"][v]
                d["regime_fraction"] = {
                    name: float(np.mean(reg == code)) for code, name in adia.REGIME_LABELS.items() if code >= 0
                }
        pr = self.probes
        if pr and len(pr.get("step", [])):
            d["gradient_measurements"] = int(len(pr["step"]))
            d["C_last"] = float(pr["C"][-1])
            d["C_last_ci"] = [float(pr["C_lo"][-1]), float(pr["C_hi"][-1])]
            d["p_last"] = float(pr["p"][-1])
            d["phase_last"] = str(pr["phase"][-1])
            d["band_last"] = str(pr["band"][-1])
            d["b_last"] = float(pr["b"][-1])
            d["n_last"] = int(pr["n"][-1])
            d["early_stopping_first"] = {k: v for k, v in self.probe_flags.items()}
            cb = np.asarray(pr.get("C_batch", []), dtype=float)
            if cb.size and np.isfinite(cb[-1]):
                d["C_batch_last"] = float(cb[-1])
                d["C_batch_last_ci"] = [float(pr["C_batch_lo"][-1]), float(pr["C_batch_hi"][-1])]
                d["p_batch_last"] = float(pr["p_batch"][-1])
            for key in ("cov_eff_rank", "cov_eff_rank_corrected", "cov_top_fraction", "C_langevin", "alpha_coord"):
                v = np.asarray(pr.get(key, []), dtype=float)
                if v.size and np.isfinite(v[-1]):
                    d[f"{key}_last"] = float(v[-1])
            if "alpha_coord_last" in d:
                d["alpha_coord_last_ci"] = [float(pr["alpha_coord_lo"][-1]), float(pr["alpha_coord_hi"][-1])]
        ti = self.tail_index
        if ti and np.isfinite(ti["alpha"]).any():
            d["alpha_gradnorm_median"] = float(np.nanmedian(ti["alpha"]))
        if ti and np.isfinite(np.asarray(ti.get("C_levy", []), dtype=float)).any():
            d["C_levy_median"] = float(np.nanmedian(ti["C_levy"]))
        for e in self.events:
            d.setdefault("events", []).append(f"{e.kind} at step {e.step} ({e.rule})")
        return d

    @property
    def probe_flags(self) -> dict[str, int | None]:
        """Early-stopping flags (DEFINITIONS §6): the step at which each first fires, or None."""
        pr = self.probes
        if not pr or not len(pr.get("step", [])):
            return {}
        fl = nz.early_stopping_flags(pr["p"], pr["C"], pr["p_hi"])
        return {k: (None if i is None else int(pr["step"][i])) for k, i in fl.first.items()}

    def probes_to_csv(self, path: str | Path) -> Path:
        """The per-measurement gradient-noise table as CSV (one row per gradient-sample measurement)."""
        path = Path(path)
        cols = {k: v for k, v in self.probes.items() if np.asarray(v).ndim == 1}
        names = list(cols)
        with open(path, "w") as fh:
            fh.write("# phasewatch gradient-noise measurements; C: canonical bias-corrected "
                     "(||g||^2 - T/n)/T, CI by the delta method; p = C/(1+C)\n")
            fh.write(",".join(names) + "\n")
            for i in range(len(cols["step"])):
                fh.write(",".join(_fmt_cell(cols[n][i]) for n in names) + "\n")
        return path

    def summary(self) -> str:
        d = self.summary_dict()
        lines = [f"windows      {d['valid_windows']} valid of {d['windows']} (W={self.window}, source={self.source})"]
        if "kstar_mode" in d:
            lines.append(f"k*           mostly {d['kstar_mode']}, changes {d['kstar_changes']} times; "
                         f"median gap ratio {d['gap_ratio_median']:.3g}")
        if "gap_excess_median" in d:
            lines.append("null         " + null_reading(d))
            if self.null.get("draws"):
                lines.append("null band    d_eff = " + str(self.null.get("dim_source", self.null.get("dim"))))
        elif self.null.get("kind") == "off" and "kstar_mode" in d:
            lines.append("null         off (null='off'): k* and the gap ratio are not judged against momentum alone")
        if "A_dk_median" in d:
            fr = d["regime_fraction"]
            lines.append(f"A_dk         median {d['A_dk_median']:.3g} (dimensionless, sin theta bound); " +
                         ", ".join(f"{k} {100 * v:.0f}%" for k, v in fr.items()))
        if "A_median" in d:
            fr = d["A_regime_fraction"]
            lines.append(f"A (canon.)   median {d['A_median']:.3g} (units 1/lr); " +
                         ", ".join(f"{k} {100 * v:.0f}%" for k, v in fr.items()))
        if "C_last" in d:
            lines.append(f"C (canon.)   {d['gradient_measurements']} measurements; last C = {d['C_last']:.3g} "
                         f"[{d['C_last_ci'][0]:.3g}, {d['C_last_ci'][1]:.3g}], p = {d['p_last']:.2f} "
                         f"({d['phase_last']}, {d['band_last']}); b={d['b_last']:g}, n={d['n_last']}")
        if "C_batch_last" in d:
            lo, hi = d["C_batch_last_ci"]
            lines.append(f"C (batch)    last C_B = B·C_1 = {d['C_batch_last']:.3g} [{lo:.3g}, {hi:.3g}], "
                         f"p_B = {d['p_batch_last']:.2f} (the training batch's signal-to-noise)")
        if "alpha_gradnorm_median" in d:
            a = d["alpha_gradnorm_median"]
            lines.append(f"alpha (Hill) median {a:.2f} over {hill_window_of(self)}-step windows of gradient norms"
                         + ("; > 2: no evidence of a stable heavy tail" if a > 2 else ""))
        if "cov_eff_rank_last" in d:
            n = d.get("n_last")
            # n samples span at most n − 1 directions: near that bound the rank says n, not the noise
            cap = (f"; at most n-1 = {n - 1} from n = {n} samples"
                   + (": set by n, not a reading" if d["cov_eff_rank_last"] >= 0.9 * (n - 1) else "")
                   if n and n >= 2 else "")
            lines.append(f"noise cov.   last: effective rank {d['cov_eff_rank_last']:.3g} (plug-in"
                         + (f"; Gaussian-corrected {d['cov_eff_rank_corrected_last']:.3g}"
                            if "cov_eff_rank_corrected_last" in d else "") + cap + ")"
                         + (f", top direction {100 * d['cov_top_fraction_last']:.0f}% of the variance"
                            if "cov_top_fraction_last" in d else ""))
        if "alpha_coord_last" in d:
            a, (lo, hi) = d["alpha_coord_last"], d["alpha_coord_last_ci"]
            lines.append(f"alpha coord. last {a:.2f} [{lo:.2f}, {hi:.2f}] (pooled Hill of standardised noise "
                         "coordinates)" + ("; > 2: no evidence of a stable heavy tail" if a > 2 else ""))
        if "C_langevin_last" in d:
            lines.append(f"C (Langevin) last {d['C_langevin_last']:.3g} (units 1/lr^2; not comparable to C)")
        if "C_levy_median" in d:
            lines.append(f"C (Levy)     median {d['C_levy_median']:.3g} over {hill_window_of(self)}-step windows "
                         "(units of ||g||^2)")
        for e in d.get("events", []):
            lines.append(f"event        {e}")
        for w in self.warnings:
            lines.append(f"warning      {w}")
        return "\n".join(lines)


def _layer_summary(layers) -> dict[str, Any]:
    from .layers import layer_summary

    return layer_summary(layers)


def _fmt_cell(x) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        return x.decode()
    if isinstance(x, (str, np.str_)):
        return str(x)
    if isinstance(x, (np.integer, int)):
        return str(int(x))
    x = float(x)
    return "" if math.isnan(x) else repr(x)


def analyze(
    run,
    window: int = 10,
    *,
    source: str = "band",
    grok_metric: str | None = None,
    grok_threshold: float = 0.95,
    rel_floor: float = gram.DEFAULT_REL_FLOOR,
    plateau_below: float = 0.1,
    forgetting_above: float = 10.0,
    chunk_steps: int | None = None,
    memory_budget: int | None = MEMORY_BUDGET,
    null: str | float = "momentum",
    null_dim: float | None = None,
    null_draws: int = nulls.DEFAULT_DRAWS,
    null_level: float = nulls.DEFAULT_LEVEL,
    null_seed: int = 0,
    regimes: str = "A_dk",
    dk_plateau_below: float = adia.DK_PLATEAU_BELOW,
    dk_forgetting_above: float = adia.DK_FORGETTING_ABOVE,
    layers: bool = False,
    rotation: bool = True,
    options: AnalysisOptions | None = None,
) -> Analysis:
    """Analyse a recorded run (a :class:`~phasewatch.store.Run` or a path).

    Parameters
    ----------
    window: Gram window W (≤ K−1 for the canonical adiabatic parameter).
    source: ``"band"`` (default; every recorded update) or ``"snapshots"`` (stored update vectors;
        consecutive snapshot steps only): both give the same spectra where both exist.
    grok_metric, grok_threshold: the metric whose first crossing is the grokking event (default:
        the first of ``test_acc``, ``test_accuracy``, ``val_acc``, ``eval_accuracy`` present).
    chunk_steps, memory_budget: streaming (``source="band"``).  ``chunk_steps=n`` reads the band
        ``n`` windows at a time (plus the W rows before each chunk that its first windows need),
        never holding the whole band: memory O(n·(K + W²)) beside the result.  ``None``
        (default): stream in chunks of ``CHUNK_WINDOWS`` when the band (T·(K+2) float64) would
        take more than ``memory_budget`` bytes (1 GiB; ``None``: never), else read it whole.  The
        result is the same either way, value for value (:func:`band_table_chunked`).  A path is
        opened lazily when streaming (:func:`~phasewatch.store.open_run` ``lazy=True``), so the
        per-layer band is never read; a run opened eagerly is chunked from memory.
    null: the momentum null of k* and the gap ratio (:mod:`~phasewatch.analysis.nulls`):
        ``"momentum"`` (default: β from the run's recorded optimizer — SGD momentum/dampening/Nesterov,
        Adam-type β₁, NAdam, Muon — and its ``stride``), ``"none"`` (β = 0), a float β (heavy ball),
        or ``"off"``: no null at all (no null columns, ``Analysis.null["kind"] == "off"``; one W×W
        eigensolve a window less — the readings then have nothing to be judged against, said in the
        summary).
    null_dim, null_draws, null_level, null_seed: its finite-dimension band (a window is
        ``above_null`` when its gap ratio exceeds the ``null_level`` quantile of the maximum gap ratio
        of ``null_draws`` seeded draws of filtered Gaussian noise in ``null_dim`` coordinates with the
        window's norms); ``null_dim=None``: :func:`null_dimension`.  ``null_draws=0``: no band.  Cost
        of the band (:func:`~phasewatch.analysis.nulls.momentum_null`): at d_eff ≥ 1000 with a clear
        maximum it is analytic (first-order perturbation, ~1 µs a window); elsewhere first-order draws
        (~15 µs), and exact draws (``null_draws`` W×W eigensolves, ≈ 0.3–0.6 ms a window) only where
        first order fails (d_eff < 1000 or near-degenerate null eigenvalues) and the reading is within
        a factor 1.5 of the band — so a run with a small d_eff whose readings sit near the band pays
        ~0.5 ms a window (~8 min per 10⁶ windows).
    regimes, dk_plateau_below, dk_forgetting_above: the ``regime`` column is classified on ``A_dk``
        (default; 0.1 and 1: sin θ of the top-k* subspace ≤ 0.1 per step, and the Davis–Kahan bound
        vacuous) or on the paper's ``A`` (``regimes="A"``; ``plateau_below``, ``forgetting_above``).
    layers: also the per-window table of every layer group (``Analysis.layers``), from the recorded
        per-layer band, streamed like the global band (:mod:`~phasewatch.analysis.layers`).
    rotation: compute the ``rotation`` column (:mod:`~phasewatch.analysis.rotation`; two small
        eigensolves a window, ~25 µs at W = 10, which is most of the cost of the table when the null is
        analytic); ``False``: the column is NaN.
    options: an :class:`~phasewatch.analysis.options.AnalysisOptions` holding all of the above and
        more (``level``, the confidence level of every interval; ``hill_window``); when given, the
        keywords are not read.  Without it one is built from the keywords.

    Notes:
    -----
    The analysis is a composition of stages, one per table (:mod:`~phasewatch.analysis.stages`),
    each returning its table and the conventions of its columns.
    """
    from ..store import open_run

    if options is None:
        options = AnalysisOptions(
            window=window, source=source, grok_metric=grok_metric, grok_threshold=grok_threshold,
            rel_floor=rel_floor, plateau_below=plateau_below, forgetting_above=forgetting_above,
            chunk_steps=chunk_steps, memory_budget=memory_budget, null=null, null_dim=null_dim,
            null_draws=null_draws, null_level=null_level, null_seed=null_seed, regimes=regimes,
            dk_plateau_below=dk_plateau_below, dk_forgetting_above=dk_forgetting_above, layers=layers,
            rotation=rotation)
    o = options
    if not hasattr(run, "table"):
        run = open_run(run, lazy=True if o.chunk_steps is not None else None)
    ns = stages.null_setup(run, o)
    chunk_default = CHUNK_WINDOWS  # read at call time (tests shrink it)
    spectra = stages.spectra(run, o, ns, chunk_default)
    layer_res = stages.layer_stage(run, o, ns, chunk_default)
    metrics = run.metrics()
    events = stages.events(metrics, o)
    probes = stages.probes(run, o)
    tail = stages.tail_index(run, o)
    curv = stages.curvature(run, probes.table, tail.table)
    ivs = stages.interventions(run)
    done = (spectra, layer_res, events, probes, tail, curv, ivs)
    return Analysis(source=o.source, window=o.window, n_params=run.n_params, table=spectra.table,
                    scalars=run.steps, metrics=metrics, events=events.table,
                    conventions=stages.collect_conventions(*done),
                    warnings=list(run.warnings) + [w for r in done for w in r.warnings], probes=probes.table,
                    tail_index=tail.table, curvature=curv.table, interventions=ivs.table, null=ns.info(o),
                    layers=layer_res.table, options=o)


