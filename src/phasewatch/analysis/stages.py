"""The stages of :func:`~phasewatch.analysis.pipeline.analyze`: one function per output table.

Each stage takes the run and the :class:`~phasewatch.analysis.options.AnalysisOptions` and returns a
:class:`StageResult`: its :class:`~phasewatch.analysis.table.Table`, the conventions of its columns
(defined here, next to the stage that computes them, and collected by ``analyze`` in
:data:`CONVENTION_ORDER`) and its warnings.

==================  =======================  ==============================================
stage               table                    conventions
==================  =======================  ==============================================
:func:`spectra`     ``table`` (per window)   source, kstar, gap, A, A_dk, regime, null, rotation, stability, bbp
:func:`layer_stage` ``layers[name]``         layers
:func:`probes`      ``probes`` (noise)       C, C_langevin, cov, alpha_coord
:func:`tail_index`  ``tail_index``           alpha, C_levy
:func:`curvature`   ``curvature``            S, eta_opt, ntk_rho, phi, I
:func:`events`      ``events``               (the rule is in each event)
:func:`interventions` ``interventions``      (none)
==================  =======================  ==============================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PhasewatchError, RunTooShortError
from ..store.format import posthoc_path
from . import gradcov, gram, nulls, tails
from . import noise as nz
from .band_table import analyze_band, band_table_chunked
from .events import Event, first_crossing, jumps
from .null_stage import null_dimension, run_null
from .options import AnalysisOptions
from .table import Table

#: The order of ``Analysis.conventions`` (the per-window CSV's header line lists them so).
CONVENTION_ORDER = ("alpha", "C", "C_langevin", "C_levy", "cov", "alpha_coord", "source", "kstar", "gap", "A",
                    "A_dk", "regime", "null", "rotation", "layers", "stability", "S", "eta_opt", "ntk_rho", "phi",
                    "I", "bbp")


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its table, the conventions of its columns, its warnings."""

    table: Any
    conventions: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def collect_conventions(*results: StageResult) -> dict[str, str]:
    """The conventions of all stages, in :data:`CONVENTION_ORDER` (then any others, as given)."""
    merged: dict[str, str] = {}
    for r in results:
        merged.update(r.conventions)
    return {**{k: merged[k] for k in CONVENTION_ORDER if k in merged},
            **{k: v for k, v in merged.items() if k not in CONVENTION_ORDER}}


# --------------------------------------------------------------------------- the momentum null
@dataclass(frozen=True)
class NullSetup:
    """The momentum null of a run and the dimension of its Monte Carlo band (``dim`` a number or a
    function of the window-end steps; ``why`` says where it came from)."""

    null: nulls.MomentumNull | None  # None: null="off"
    dim: Any
    why: Any

    @property
    def banded(self) -> bool:
        """True when the null has a finite-dimension band."""
        return self.null is not None and (callable(self.dim) or math.isfinite(self.dim))

    def table_options(self, o: AnalysisOptions) -> dict[str, Any]:
        """The null and classification keywords of :func:`band_table_chunked`."""
        return dict(null=self.null, null_dim=self.dim, null_draws=o.null_draws, null_level=o.null_level,
                    null_seed=o.null_seed, regimes=o.regimes, dk_plateau_below=o.dk_plateau_below,
                    dk_forgetting_above=o.dk_forgetting_above, rotation=o.rotation)

    def info(self, o: AnalysisOptions) -> dict[str, Any]:
        """``Analysis.null``."""
        m = self.null
        if m is None:
            return {"kind": "off", "draws": 0, "source": "null='off': no momentum null computed"}
        return {"kind": m.kind, "beta": m.beta, "rho1": float(m.rho(2)[1]), "stride": m.stride,
                "dim": self.why if callable(self.dim) else self.dim, "dim_source": str(self.why),
                "draws": int(o.null_draws) if self.banded else 0, "level": float(o.null_level), "source": m.source}


def null_setup(run, o: AnalysisOptions) -> NullSetup:
    """The run's momentum null (``o.null``) and its band's dimension (``o.null_dim``, else
    :func:`~phasewatch.analysis.null_stage.null_dimension`)."""
    if o.null == "off":
        return NullSetup(None, math.inf, "off")
    mnull = run_null(run, o.null)
    if o.null_dim is None:
        dim, why = null_dimension(run)
    else:
        dim = float(o.null_dim)
        why = f"{dim:g} (given)"
    return NullSetup(mnull, dim, why)


# --------------------------------------------------------------------------- spectra (per window)
def _spectra_conventions(o: AnalysisOptions, ns: NullSetup, source: str) -> dict[str, str]:
    """Conventions of the per-window table."""
    return {
        "source": source,
        "kstar": "argmax_j sigma_j/sigma_{j+1} (plain); kstar_weighted: (sigma_j/sum sigma)*(sigma_j/sigma_{j+1})",
        "gap": "sigma_k* - sigma_k*+1; gap_ratio sigma_k*/sigma_k*+1; g23 = lambda_2 - lambda_3",
        "A": "canonical ||Delta C||_F/(eta g^2) (the paper's; units 1/eta: halves when the learning rate doubles), "
             "C = sum u u^T over the window; A_eigen: eigenvalue-change proxy",
        "A_dk": "||Delta C||_F/(lambda_k* - lambda_k*+1) (dimensionless; Davis-Kahan: sin theta of the top-k* "
                "subspace between consecutive windows <~ A_dk)",
        "regime": (f"on A_dk: 0 plateau (A_dk<{o.dk_plateau_below:g}: sin theta <= {o.dk_plateau_below:g} per step), "
                   f"1 transition, 2 forgetting (A_dk>{o.dk_forgetting_above:g}: the rotation bound is vacuous), "
                   "-1 undefined" if o.regimes == "A_dk" else
                   f"on A (units 1/eta): 0 plateau (A<{o.plateau_below:g}), 1 transition, 2 forgetting "
                   f"(A>{o.forgetting_above:g}), -1 undefined")
                  + f"; regime_A: the paper's A with {o.plateau_below:g} / {o.forgetting_above:g}",
        "null": "off (null='off'): no momentum null; k* and the gap ratio are not judged against chance"
                if ns.null is None else ns.null.describe() + "; G0[a,b] = |u_a||u_b| rho(|a-b|) with the window's own update norms; "
                "gap_ratio_null = sigma0_k*/sigma0_k*+1 at the observed k*, gap_excess = gap_ratio/gap_ratio_null, "
                "g23_excess = g23/(lambda0_2 - lambda0_3); above_null: gap_ratio > gap_ratio_null_hi, the "
                + (f"{o.null_level:g} quantile of the max gap ratio of filtered Gaussian noise in d_eff coordinates "
                   f"(analytic to first order at d_eff >= {nulls.FIRST_ORDER_DIM:g} with one clear maximum; else "
                   f"over {o.null_draws} seeded (seed {o.null_seed}) draws, exact Wishart ones where first order "
                   f"fails and the reading is within x{nulls.EXACT_NEAR:g} of the band), d_eff = {ns.why}"
                   if o.null_draws > 0 and ns.banded else "null itself (no finite-dimension band)"),
        "rotation": "largest principal angle (radians; rotation_sin its sine) between the top-k* right singular "
                    "subspaces of the window and the one a row before it, k* of the later window, from the band's "
                    "cross inner products (needs K >= W+1: NaN otherwise, and in the first window of a trajectory)"
                    + ("" if o.rotation else "; not computed here (rotation=False): NaN"),
        "stability": "s_j = 1 - ||Delta C||_F^2 / gap_j^2, gap_j = min_k |lambda_j - lambda_k| (canonical Delta C)",
        "bbp": "sigma1_over_dcrit = sigma_1/d_crit (DEFINITIONS); sigma1_over_edge = sigma_1/noise edge (~1 on noise)",
    }


def _band_width(run, bt) -> int:
    """K of a run's band, from its schema (reading no band rows)."""
    spec = run.meta.get("tables", {}).get("band", {}).get("band")
    if spec and len(spec[1]) == 1:
        return int(spec[1][0])
    return int(np.asarray(bt["band"]).shape[-1])


def _stream_chunk(run, bt, chunk_steps: int | None, memory_budget: int | None, chunk_default: int) -> int | None:
    """Windows per chunk when the band is to be streamed, None to read it whole."""
    if chunk_steps is not None:
        return int(chunk_steps)
    if memory_budget is None or not hasattr(bt, "rows"):
        return None  # no budget, or a table that is in memory already
    need = len(bt["step"]) * (_band_width(run, bt) + 2) * 8
    return chunk_default if need > memory_budget else None


def _band_reader(bt):
    """``read(lo, hi)`` -> (global band rows, learning rates) of a band table: by row range from
    the segments for a lazy table, by slicing for one in memory."""
    if hasattr(bt, "rows"):
        def read(lo: int, hi: int):
            r = bt.rows(lo, hi, ("band", "lr"))
            return r["band"], r["lr"]
    else:
        def read(lo: int, hi: int):
            return bt["band"][lo:hi], bt["lr"][lo:hi]
    return read


def _snapshot_table(run, o: AnalysisOptions, opts: dict, where: str) -> dict[str, np.ndarray]:
    """The per-window table from the run's stored update snapshots (consecutive steps only)."""
    window = o.window
    snap = run.table("snapshots")
    if len(snap["step"]) < window:
        raise RunTooShortError(f"{where}: {len(snap['step'])} snapshots, fewer than W={window}; record with "
                               "snapshot_every=1 over the range to analyse, or use source='band'")
    u = np.asarray(snap["update"], dtype=np.float64)
    k = window + 1
    band = gram.band_from_updates(u, k)
    # rows whose predecessor is not the previous recorded update break the window
    stride = int(run.meta.get("recorder", {}).get("stride", 1) or 1)
    gaps = np.nonzero(np.diff(snap["step"]) != stride)[0] + 1
    for g in gaps:
        band[g: g + k] = np.where(np.arange(k)[None, :] > (np.arange(g, min(g + k, len(band)))[:, None] - g),
                                  np.nan, band[g: g + k])
    bt = run.band
    lr = np.interp(snap["step"], bt["step"], bt["lr"]) if len(bt["step"]) else np.full(len(u), np.nan)
    return analyze_band(band, lr, snap["step"], window, **opts)


def spectra(run, o: AnalysisOptions, ns: NullSetup, chunk_default: int) -> StageResult:
    """The per-window table (σ_j, k*, gap ratio, g₂₃, A, A_dk, regimes, rotation, the null's columns)
    from the band (``o.source="band"``, streamed in chunks when it is large) or the snapshots."""
    where = str(run.path)
    opts = dict(n_params=run.n_params or None, rel_floor=o.rel_floor, plateau_below=o.plateau_below,
                forgetting_above=o.forgetting_above, where=where, **ns.table_options(o))
    if o.source == "band":
        bt = run.band
        if not len(bt["step"]):
            raise RunTooShortError(f"{where}: the run has no recorded updates (empty run); train "
                                   "at least W steps with the recorder attached")
        chunk = _stream_chunk(run, bt, o.chunk_steps, o.memory_budget, chunk_default)
        if chunk is None:
            table = analyze_band(bt["band"], bt["lr"], bt["step"], o.window, **opts)
        else:
            table = band_table_chunked(_band_reader(bt), bt["step"], _band_width(run, bt), o.window,
                                       chunk_windows=chunk, **opts)
        src = "band (exact float64 inner products)" if run.meta.get("recorder", {}).get("mode") != "projected" \
            else f"band of sign-fold projections, d={run.meta['recorder'].get('proj_dim')}"
    elif o.source == "snapshots":
        table = _snapshot_table(run, o, opts, where)
        src = f"stored {run.meta.get('recorder', {}).get('snapshot_kind', 'raw')} update snapshots"
    else:
        raise PhasewatchError(f"source={o.source!r}: use 'band' or 'snapshots'")
    warns = []
    flags = run.steps.get("flags")
    if flags is not None and np.any(flags):
        bad = run.steps["step"][flags != 0]
        warns.append(f"{bad.size} steps flagged non-finite (first at step {int(bad[0])}); "
                     "windows containing a non-finite update are marked invalid")
    n_invalid = int((~table["valid"]).sum())
    if n_invalid:
        warns.append(f"{n_invalid} of {table['valid'].size} windows invalid (non-finite updates, or "
                     "the start of a resumed segment)")
    return StageResult(Table(table, "window"), _spectra_conventions(o, ns, src), tuple(warns))


# --------------------------------------------------------------------------- per layer group
LAYERS_CONVENTION = ("per layer group: the same table from the group's own recorded band, P and d_eff of the null = "
                     "the group's recorded dim; lock-in: the first step starting "
                     "5 consecutive valid windows above the null's band")


def layer_stage(run, o: AnalysisOptions, ns: NullSetup, chunk_default: int) -> StageResult:
    """Per layer group the per-window table (``o.layers``; else no tables and no convention)."""
    if not o.layers:
        return StageResult({})
    from .layers import run_layer_tables

    lopts = dict(rel_floor=o.rel_floor, plateau_below=o.plateau_below, forgetting_above=o.forgetting_above,
                 where=str(run.path), **ns.table_options(o))
    tabs = run_layer_tables(run, run.band, o.window, o.chunk_steps, o.memory_budget, table_fn=band_table_chunked,
                            chunk_default=chunk_default, **lopts)
    return StageResult({k: Table(v, k) for k, v in tabs.items()}, {"layers": LAYERS_CONVENTION})


# --------------------------------------------------------------------------- events
GROK_METRICS = ("test_acc", "test_accuracy", "val_acc", "eval_accuracy")


def events(metrics: dict, o: AnalysisOptions) -> StageResult:
    """The grokking step (first crossing of ``o.grok_threshold`` by ``o.grok_metric``, default the first
    of :data:`GROK_METRICS` logged) and the accuracy jumps of that metric: a list of
    :class:`~phasewatch.analysis.events.Event` (:func:`event_table` makes it a table)."""
    found: list[Event] = []
    name = o.grok_metric or next((m for m in GROK_METRICS if m in metrics), None)
    if name and name in metrics:
        s, v = metrics[name]
        ev = first_crossing(s, v, o.grok_threshold, name, kind="grokking")
        if ev:
            found.append(ev)
        found.extend(jumps(s, v, metric=name))
    return StageResult(found)


def event_table(evs: list[Event]) -> Table:
    """Events as a table: ``step``, ``kind``, ``metric``, ``value``, ``rule``, ``end`` (−1: none)."""
    return Table({"step": np.array([e.step for e in evs], dtype="i8"),
                  "kind": np.array([e.kind for e in evs], dtype=str),
                  "metric": np.array([e.metric for e in evs], dtype=str),
                  "value": np.array([e.value for e in evs], dtype=float),
                  "rule": np.array([e.rule for e in evs], dtype=str),
                  "end": np.array([-1 if e.end is None else e.end for e in evs], dtype="i8")}, "events")


# --------------------------------------------------------------------------- gradient noise (probes)
def _probe_conventions(o: AnalysisOptions) -> dict[str, str]:
    lv = o.level_note
    return {
        "C": "canonical (||g_bar||^2 - T/n)/T with delta-method CI" + lv + " (from the stored moments; with "
             "n < 4 samples the Gaussian worst-case bound, wide: their moments cannot estimate the noise of T)"
             "; C_naive = ||g_bar||^2/T; "
             "C_per_example = C/b; B_simple = 1/C_per_example; C_batch = B*C_per_example (B the training "
             "batch: Recorder(batch_size), else b*n for micro-batch/per-rank samples), p_batch = C_batch/(1+C_batch)",
        "C_langevin": "B ||g_bar||^2/(eta^2 b T) (= ||g||^2/(2DP), D = eta^2 sigma^2/(2B)), delta-method CI" + lv
                      + "; units 1/eta^2; eta = lr of param group 0 at the measurement step; B = Recorder(batch_size), "
                      "else b*n for micro-batch/per-rank samples, else NaN",
        "cov": "sample covariance of the gradient samples: cov_top = lambda_1, cov_top_fraction = lambda_1/Tr, "
               "cov_eff_rank = Tr^2/Tr(Sigma^2) (plug-in, <= n-1), cov_eff_rank_corrected = ratio of "
               "Gaussian-unbiased estimates of Tr^2 and Tr(Sigma^2)",
        "alpha_coord": "pooled Hill (top 10%) of the grad_proj noise coordinates, each divided by its median "
                       f"|x| first; {100 * o.level:g}% percentile bootstrap over samples; alpha > 2: no evidence of "
                       "a stable heavy tail",
    }


def probes(run, o: AnalysisOptions) -> StageResult:
    """The per-measurement gradient-noise table (:func:`noise_table`, with the ``grad_proj`` coordinate
    tail index when recorded) at confidence level ``o.level``; empty for a run without gradient samples."""
    tab: dict[str, np.ndarray] = {}
    tables = run.meta.get("tables", {})
    if "grad_samples" in tables:
        gs = run.table("grad_samples")
        if len(gs["step"]):
            tab = noise_table(gs, o.level, **gradcov.measurement_inputs(gs, run.steps, run.meta))
            if "grad_proj" in tables:
                tab.update(gradcov.coordinate_columns(run.table("grad_proj"), tab["step"], level=o.level))
    return StageResult(Table(tab, "noise"), _probe_conventions(o))

def noise_table(gs: dict[str, np.ndarray], level: float = 0.95, *, lr=None, batch_size=None) -> dict[str, np.ndarray]:
    """Per gradient-sample measurement: consolidation ratio (canonical, delta-method CI), its naive
    variant, C_1 = C_b/b, p with CI, phase, decision band, B_simple = 1/C_1, and per-layer canonical C;
    the covariance spectrum (``cov_eff_rank``, ``cov_eff_rank_corrected``; ``cov_top``,
    ``cov_top_fraction`` when the run has ``cov_eigs``) and ``C_langevin`` with its CI where ``lr``
    and ``batch_size`` (per measurement, e.g. :func:`~phasewatch.analysis.gradcov.measurement_inputs`)
    are known (:func:`~phasewatch.analysis.gradcov.probe_columns`).

    Input: the ``grad_samples`` table of a run (sufficient statistics written by the recorder).
    """
    n = np.asarray(gs["n"], dtype=float)
    out: dict[str, np.ndarray] = {"step": np.asarray(gs["step"], dtype="i8")}
    if not len(n):
        return {}
    src = gs.get("source")
    out["source"] = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in src]) if src is not None \
        else np.full(len(n), "")
    out["n"] = n.astype("i8")
    out["b"] = np.asarray(gs["b"], dtype=float)
    stats = {k: np.asarray(gs[k], dtype=float) for k in ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third")}
    ok = n >= 2
    cols = ("C", "C_lo", "C_hi", "p", "p_lo", "p_hi", "C_per_example", "C_naive", "B_simple")
    for c in cols:
        out[c] = np.full(len(n), np.nan)
    out["phase"] = np.full(len(n), "", dtype=object)
    out["band"] = np.full(len(n), "", dtype=object)
    if ok.any():
        b = np.where(np.isfinite(out["b"]), out["b"], 1.0)[ok]
        r = nz.consolidation_ratio(n=out["n"][ok], b=b, ci="delta", level=level,
                                   **{k: v[ok] for k, v in stats.items()})
        out["C"][ok], out["p"][ok] = r.C, r.p
        out["C_lo"][ok], out["C_hi"][ok] = r.ci[:, 0], r.ci[:, 1]
        out["p_lo"][ok], out["p_hi"][ok] = r.p_ci[:, 0], r.p_ci[:, 1]
        # with b unknown (micro-batches of unstated size) C is per sample; C_1 and B_simple are not known
        out["C_per_example"][ok] = np.where(np.isfinite(out["b"][ok]), r.C_per_example, np.nan)
        out["phase"][ok], out["band"][ok] = r.phase, r.band
        rn = nz.consolidation_ratio(n=out["n"][ok], b=b, variant="naive", ci="none",
                                    mean_sq_norm=stats["mean_sq_norm"][ok], trace=stats["trace"][ok])
        out["C_naive"][ok] = rn.C
        with np.errstate(divide="ignore"):
            c1 = out["C_per_example"][ok]
            out["B_simple"][ok] = np.where(c1 > 0, 1.0 / c1, np.where(np.isnan(c1), np.nan, np.inf))
    if "layer_trace" in gs and np.asarray(gs["layer_trace"]).ndim == 2:
        lt = np.asarray(gs["layer_trace"], dtype=float)
        lm = np.asarray(gs["layer_mean_sq_norm"], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["layer_C"] = np.maximum(lm - lt / n[:, None], 0.0) / lt
    out.update(gradcov.probe_columns(gs, lr=lr, batch_size=batch_size, level=level))
    if batch_size is not None:
        # the SNR of a training-batch gradient: C_B = B·C_1 = (B/b)·C_b (DEFINITIONS §2), CI scaled alike
        B = np.broadcast_to(np.asarray(batch_size, dtype=float), n.shape)
        if np.isfinite(B).any():
            with np.errstate(invalid="ignore"):
                scale = B / out["b"]
                out["C_batch"] = out["C"] * scale
                out["C_batch_lo"], out["C_batch_hi"] = out["C_lo"] * scale, out["C_hi"] * scale
                for c in ("", "_lo", "_hi"):
                    out["p_batch" + c] = out["C_batch" + c] / (1.0 + out["C_batch" + c])
    out["phase"] = out["phase"].astype(str)
    out["band"] = out["band"].astype(str)
    return out




# --------------------------------------------------------------------------- tail index of gradient norms
def _tail_conventions(o: AnalysisOptions, gn_input: str) -> dict[str, str]:
    w, top = o.hill_window, int(o.hill_fraction * o.hill_window) + 1
    pct = f"{100 * o.hill_fraction:g}%"
    return {
        "alpha": f"Hill MLE on the top {pct} of the last {w} {gn_input} (the note's choice), exact chi2 CI"
                 + o.level_note + "; alpha > 2: no evidence of a stable heavy tail; alpha_degenerate: the window's "
                 f"top {top} hold an atom or near-ties (e.g. clipped norms), alpha NaN, alpha_tied_fraction of the "
                 "window in it",
        "C_levy": f"levy variant per step (tail_index): window of the last {w} gradient norms, Hill alpha on the top "
                  f"10% clipped to [1.1, 1.9], D = (std/||g_t||)^alpha, C = ||g_t||^2/(2 D {w}) (divides by the "
                  "window length, as the note does); units of ||g||^2",
    }


def _tail_norms(steps: dict) -> tuple[np.ndarray | None, str]:
    """The gradient norms the tail analyses use (DEFINITIONS §3): the norm before clipping where the
    run recorded it (``grad_norm_unclipped``), else the recorded one (after clipping)."""
    gn = steps.get("grad_norm")
    un = steps.get("grad_norm_unclipped")
    if gn is None or un is None or not np.isfinite(un).any():
        return gn, "gradient norms"
    un = np.asarray(un, dtype=np.float64)
    have = np.isfinite(un)
    if have.all():
        return un, "gradient norms before clipping"
    return (np.where(have, un, np.asarray(gn, dtype=np.float64)),
            f"gradient norms (before clipping at {int(have.sum())} of {have.size} steps; after clipping at the "
            "others)")


def tail_index(run, o: AnalysisOptions) -> StageResult:
    """Rolling Hill α (with its exact χ² interval at ``o.level``) and the Lévy consolidation ratio on
    windows of ``o.hill_window`` gradient norms; empty for a run with fewer norms."""
    gn, gn_input = _tail_norms(run.steps)
    tab: dict[str, np.ndarray] = {}
    warns: tuple[str, ...] = ()
    if gn is not None and len(gn) >= o.hill_window:
        rh = tails.rolling_hill(gn, window=o.hill_window, fraction=o.hill_fraction, level=o.level,
                                input_description=gn_input)
        tab = {"step": run.steps["step"][rh.ends], "alpha": rh.alpha,
               "alpha_lo": rh.ci[:, 0], "alpha_hi": rh.ci[:, 1],
               "alpha_degenerate": rh.degenerate, "alpha_tied_fraction": rh.tied_fraction,
               "C_levy": gradcov.levy_rolling(gn, window=o.hill_window).C}
        warns = tuple(f"tail index ({gn_input}): {f}" for f in rh.flags)
    return StageResult(Table(tab, "tail_index"), _tail_conventions(o, gn_input), warns)


# --------------------------------------------------------------------------- curvature probes
CURVATURE_CONVENTIONS = {
    "S": "threshold - lambda_max (2/eta for GD; 2(1+beta)/eta heavy-ball; Adam: (2+2b1)/((1-b1)eta_t) against "
         "the preconditioned sharpness lambda_max(D^-1 H)); lambda_max by Lanczos to residual <= tol*|lambda|",
    "eta_opt": "2D/lambda_max with D = 1 (the largest stable step; reported, not acted on)",
    "ntk_rho": "sum of ln(eigenvalues) of K = J J^T/n above 1e-6 * lambda_1; ntk_rate = backward difference per step",
    "phi": "exp(-[(C-1)^2/(2*0.3^2) + S^2/(2*0.15^2) + (r-1)^2/(2*0.5^2)]), r = d rho/dt (note 001); "
           "all_critical: 0.8<=C<=1.2, |S|<=0.1, |r|>0.5; C here is C_crit = C_batch (training batch) where "
           "the batch size is known, else the probe's C_b; C, alpha: latest measurement at or before the probe",
    "I": "p*S/min(d, alpha) (note 000; the framework's heuristic)",
}


def curvature(run, probe_table: dict, tail_table: dict) -> StageResult:
    """The per-probe curvature table of a run: its own probes plus post-hoc ones (``phasewatch
    curvature`` writes them to a run beside it; see :func:`posthoc_path`), with S, Φ and I from the
    probes' C and the tail index (empty for a run without curvature probes)."""
    from . import curvature as cv

    tabs = run.meta.get("tables", {})
    hess = run.table("curvature") if "curvature" in tabs else None
    ntk = run.table("ntk") if "ntk" in tabs else None
    ph = posthoc_path(run.path)
    if ph.exists():
        from ..store import open_run

        post = open_run(ph)
        ptabs = post.meta.get("tables", {})
        hess = _merge(hess, post.table("curvature") if "curvature" in ptabs else None)
        ntk = _merge(ntk, post.table("ntk") if "ntk" in ptabs else None)
    opt = run.meta.get("optimizer", {})

    def threshold_fn(lr):
        return cv.stability_threshold(opt.get("class", ""), lr, opt.get("hyper", {}))

    st = run.steps
    tab = cv.curvature_columns(hess, ntk, probe_table, tail_table, lr_steps=st.get("step"),
                               lr_values=(st["lr"][:, 0] if "lr" in st and len(st["lr"]) else None),
                               threshold_fn=threshold_fn)
    return StageResult(Table(tab, "curvature"), dict(CURVATURE_CONVENTIONS))


def _merge(a: dict | None, b: dict | None) -> dict | None:
    """Rows of two tables with the same columns, by step; rows of ``b`` win at equal steps."""
    if not a or not len(a.get("step", [])):
        return b
    if not b or not len(b.get("step", [])):
        return a
    keep = ~np.isin(a["step"], b["step"])
    cols = [c for c in a if c in b]

    def pad(x: np.ndarray, width: int) -> np.ndarray:  # top-k columns of different k: NaN-pad
        if x.ndim != 2 or x.shape[1] >= width:
            return x
        return np.concatenate([x.astype(float), np.full((x.shape[0], width - x.shape[1]), np.nan)], axis=1)

    merged = {}
    for c in cols:
        xa, xb = np.asarray(a[c])[keep], np.asarray(b[c])
        w = max(xa.shape[1] if xa.ndim == 2 else 0, xb.shape[1] if xb.ndim == 2 else 0)
        merged[c] = np.concatenate([pad(xa, w), pad(xb, w)])
    order = np.argsort(merged["step"], kind="stable")
    return {c: v[order] for c, v in merged.items()}


# --------------------------------------------------------------------------- controllers' interventions
def interventions(run) -> StageResult:
    """The changes controllers made during the run (``step``, ``rule``, ``param``, ``old``, ``new``,
    ``note``; text as str arrays); empty if none."""
    tab: dict[str, np.ndarray] = {}
    if "interventions" in run.meta.get("tables", {}):
        iv = run.table("interventions")
        if len(iv["step"]):
            tab = {k: (np.char.decode(v, "utf-8", "replace").astype(str) if v.dtype.kind == "S"
                       else np.asarray(v)) for k, v in iv.items()}
    return StageResult(Table(tab, "interventions"))
