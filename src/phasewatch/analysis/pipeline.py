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
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError, RunTooShortError
from ..store.format import posthoc_path
from . import adiabatic as adia
from . import gradcov, gram, nulls, tails
from . import noise as nz
from . import rotation as rotating
from .events import Event, first_crossing, jumps
from .null_stage import null_dimension, null_reading, null_summary, run_null, window_null_columns  # noqa: F401

log = logging.getLogger("phasewatch")

CHUNK_WINDOWS = 100_000
#: ``analyze`` streams the band (reads it chunk by chunk) when holding it would take more than this.
MEMORY_BUDGET = 1 << 30


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
    """

    source: str
    window: int
    n_params: int
    table: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray]
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    events: list[Event] = field(default_factory=list)
    conventions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    probes: dict[str, np.ndarray] = field(default_factory=dict)
    tail_index: dict[str, np.ndarray] = field(default_factory=dict)
    curvature: dict[str, np.ndarray] = field(default_factory=dict)
    interventions: dict[str, np.ndarray] = field(default_factory=dict)
    null: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

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
            lines.append(f"alpha (Hill) median {a:.2f} over 100-step windows of gradient norms"
                         + ("; > 2: no evidence of a stable heavy tail" if a > 2 else ""))
        if "cov_eff_rank_last" in d:
            lines.append(f"noise cov.   last: effective rank {d['cov_eff_rank_last']:.3g} (plug-in"
                         + (f"; Gaussian-corrected {d['cov_eff_rank_corrected_last']:.3g}"
                            if "cov_eff_rank_corrected_last" in d else "") + ")"
                         + (f", top direction {100 * d['cov_top_fraction_last']:.0f}% of the variance"
                            if "cov_top_fraction_last" in d else ""))
        if "alpha_coord_last" in d:
            a, (lo, hi) = d["alpha_coord_last"], d["alpha_coord_last_ci"]
            lines.append(f"alpha coord. last {a:.2f} [{lo:.2f}, {hi:.2f}] (pooled Hill of standardised noise "
                         "coordinates)" + ("; > 2: no evidence of a stable heavy tail" if a > 2 else ""))
        if "C_langevin_last" in d:
            lines.append(f"C (Langevin) last {d['C_langevin_last']:.3g} (units 1/lr^2; not comparable to C)")
        if "C_levy_median" in d:
            lines.append(f"C (Levy)     median {d['C_levy_median']:.3g} over 100-step windows (units of ||g||^2)")
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


def _progress(total: int, desc: str):
    if total < 3 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="win", file=sys.stderr, leave=False)


def analyze_band(
    band: np.ndarray,
    lr: np.ndarray,
    steps: np.ndarray,
    window: int = 10,
    *,
    n_params: int | None = None,
    rel_floor: float = gram.DEFAULT_REL_FLOOR,
    plateau_below: float = 0.1,
    forgetting_above: float = 10.0,
    where: str = "run",
    chunk_windows: int = CHUNK_WINDOWS,
    **null_opts,
) -> dict[str, np.ndarray]:
    """The per-window table from a band (T, K) or per-layer band (T, L, K), in chunks of
    ``chunk_windows`` windows (see :func:`band_table_chunked`; ``null_opts`` are its ``null``,
    ``null_dim``, ``null_draws``, ``null_level``, ``null_seed``, ``regimes``, ``dk_plateau_below``,
    ``dk_forgetting_above``)."""
    b = gram.global_band(np.asarray(band, dtype=np.float64))
    lr = np.asarray(lr, dtype=float)
    T, K = b.shape

    def read(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return b[lo:hi], lr[lo:hi]

    return band_table_chunked(read, steps, K, window, n_params=n_params, rel_floor=rel_floor,
                              plateau_below=plateau_below, forgetting_above=forgetting_above, where=where,
                              chunk_windows=chunk_windows, **null_opts)


def band_table_chunked(
    read,
    steps: np.ndarray,
    K: int,
    window: int = 10,
    *,
    n_params: int | None = None,
    rel_floor: float = gram.DEFAULT_REL_FLOOR,
    plateau_below: float = 0.1,
    forgetting_above: float = 10.0,
    where: str = "run",
    chunk_windows: int = CHUNK_WINDOWS,
    null: nulls.MomentumNull | None = None,
    null_dim=math.inf,
    null_draws: int = nulls.DEFAULT_DRAWS,
    null_level: float = nulls.DEFAULT_LEVEL,
    null_seed: int = 0,
    regimes: str = "A_dk",
    dk_plateau_below: float = adia.DK_PLATEAU_BELOW,
    dk_forgetting_above: float = adia.DK_FORGETTING_ABOVE,
    rotation: bool = True,
) -> dict[str, np.ndarray]:
    """The per-window table of :func:`analyze_band`, reading the band chunk by chunk.

    Beside the spectra and A: ``A_dk`` (:func:`~phasewatch.analysis.adiabatic.adiabatic_ratio`) and
    ``regime`` classified on ``regimes`` (``"A_dk"``, default, thresholds ``dk_*``; or ``"A"``),
    ``regime_A`` (the paper's A, ``plateau_below``/``forgetting_above``); with a ``null``
    (:class:`~phasewatch.analysis.nulls.MomentumNull`) the momentum-null columns of
    :func:`~phasewatch.analysis.nulls.momentum_null` (``kstar_null``, ``gap_ratio_null``,
    ``gap_excess``, ``gap_ratio_null_hi``, ``above_null``, ``g23_null``, ``g23_excess``) from each
    window's own update norms, with a Monte Carlo band in ``null_dim`` coordinates (a number, or a
    function of the window-end steps giving one per window; seeded, the same draws for every window
    of one dimension: chunk-invariant).

    ``read(lo, hi)`` returns the global band rows ``lo <= r < hi`` (``(hi - lo, K)`` float64) and
    their learning rates; ``steps`` (T,) holds the step of every band row.  The windows ending at
    rows ``start <= r < start + chunk_windows`` are computed from rows ``start - W .. stop - 1``:
    W − 1 rows before ``start`` complete the first window, one more gives the lag-W inner product
    of the canonical A and the previous window of ``A_eigen``.  Every window is therefore computed
    from exactly the rows it depends on, whatever the chunking, and each statistic is a per-window
    function (batched ``eigvalsh`` solves each matrix on its own): the table is the same, value for
    value, for every ``chunk_windows`` ≥ 1.  Memory: O(chunk_windows · (K + W²)) beside the
    returned table (allocated once, N × (2W + 14) values).
    """
    steps = np.asarray(steps)
    T = len(steps)
    if window < 2:
        raise PhasewatchError(f"window={window}: the Gram window needs W >= 2")
    if window > K:
        raise PhasewatchError(f"{where}: window W={window} exceeds the recorded band K={K}; "
                              f"pass --window {K - 1} or less (or record with a larger k)")
    if T < window:
        raise RunTooShortError(f"{where}: {T} recorded updates, fewer than the window W={window}; "
                               f"record longer or pass a smaller --window")
    if regimes not in ("A_dk", "A"):
        raise PhasewatchError(f"regimes={regimes!r}: use 'A_dk' (dimensionless, default) or 'A' (the paper's)")
    if int(chunk_windows) < 1:
        raise PhasewatchError(f"chunk of {chunk_windows} windows: use 1 or more")
    chunk_windows = int(chunk_windows)
    if window + 1 > K:
        log.warning("phasewatch: K=%d < W+1=%d: the canonical A needs lag W; only A_eigen is computed", K, window + 1)
    n_win = T - window + 1
    out: dict[str, np.ndarray] = {}
    bar = _progress(n_win, "spectra")
    for start in range(window - 1, T, chunk_windows):  # start = first window end of the chunk
        stop = min(T, start + chunk_windows)
        lo = max(0, start - window)  # room for lag W (canonical A) and the previous window (eigen A)
        sub, sub_lr = read(lo, stop)
        sub = gram.global_band(np.asarray(sub, dtype=np.float64))
        sub_lr = np.asarray(sub_lr, dtype=float)
        if sub.shape != (stop - lo, K) or sub_lr.shape != (stop - lo,):
            raise PhasewatchError(f"{where}: band rows {lo}:{stop} came back with shape {sub.shape}; "
                                  "the run changed while it was read")
        spec = gram.compute_spectra(sub, window, n_params=n_params, rel_floor=rel_floor)
        with np.errstate(invalid="ignore", divide="ignore"):
            with warnings.catch_warnings():  # K < W+1 was reported above, once
                warnings.simplefilter("ignore", RuntimeWarning)
                a_can = adia.adiabatic(sub, spec.eigs, spec.ends, spec.gap, sub_lr, window, "canonical",
                                       plateau_below=plateau_below, forgetting_above=forgetting_above)
            a_eig = adia.adiabatic(sub, spec.eigs, spec.ends, spec.gap, sub_lr, window, "eigen",
                                   plateau_below=plateau_below, forgetting_above=forgetting_above)
        keep = spec.ends + lo >= start
        stab = gram.stability_coefficients(spec.eigs, a_can.delta_fro)
        a_dk = adia.adiabatic_ratio(a_can.delta_fro, spec.eigs, spec.kstar, plateau_below=dk_plateau_below,
                                    forgetting_above=dk_forgetting_above)
        if n_params:
            ref = gram.bbp_reference(spec.eigs, n_params, window)
            s1_dcrit, s1_edge = ref.ratio[:, 0], ref.edge_ratio[:, 0]
        else:
            s1_dcrit = s1_edge = np.full(len(spec.ends), np.nan)
        rot, rot_sin = (rotating.window_rotation(sub, spec.kstar, spec.ends, window, rel_floor) if rotation
                        else (np.full(len(spec.ends), np.nan),) * 2)
        local = spec.ends[keep]
        part = {
            "step": steps[local + lo].astype("i8"),
            "lr": sub_lr[local],
            "update_norm": np.sqrt(np.maximum(sub[local, 0], 0)),
            "kstar": spec.kstar[keep].astype("i8"),
            "gap_ratio": spec.ratio[keep],
            "gap": spec.gap[keep],
            "kstar_weighted": spec.kstar_weighted[keep].astype("i8"),
            "g23": spec.g23[keep],
            "sigma1_over_dcrit": s1_dcrit[keep],
            "sigma1_over_edge": s1_edge[keep],
            "A": a_can.A[keep],
            "A_eigen": a_eig.A[keep],
            "A_dk": a_dk.A_dk[keep],
            "rotation": rot[keep],
            "rotation_sin": rot_sin[keep],
            "regime": (a_dk.regime if regimes == "A_dk" else a_can.regime)[keep].astype("i8"),
            "regime_A": a_can.regime[keep].astype("i8"),
            "valid": spec.valid[keep],
            "sigma": spec.sigma[keep],
            "stability": stab[keep],
        }
        if null is not None:
            part.update(window_null_columns(sub, spec, keep, part["step"], window, null, null_dim, null_draws,
                                      null_level, null_seed, rel_floor))
        if not out:  # the table is allocated once: no concatenation (no second copy) at the end
            out = {k: np.empty((n_win, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        at = start - (window - 1)
        for k, v in part.items():
            out[k][at: at + len(v)] = v
        del spec, a_can, a_eig, a_dk, stab, sub, part
        if bar is not None:
            bar.update(int(keep.sum()))
    if bar is not None:
        bar.close()
    return out


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
        Adam-type β₁, NAdam, Muon — and its ``stride``), ``"none"`` (β = 0) or a float β (heavy ball).
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
    """
    from ..store import open_run

    if chunk_steps is not None and (isinstance(chunk_steps, bool) or int(chunk_steps) < 1):
        raise PhasewatchError(f"chunk_steps={chunk_steps!r}: use a number of windows >= 1, or None")
    if chunk_steps is not None and source != "band":
        raise PhasewatchError(f"chunk_steps streams the band; source={source!r} reads its snapshots whole")
    if not hasattr(run, "table"):
        run = open_run(run, lazy=True if chunk_steps is not None else None)
    where = str(run.path)
    warns = list(run.warnings)
    mnull = run_null(run, null)
    if null_dim is None:
        null_dim, dim_why = null_dimension(run)
    else:
        null_dim = float(null_dim)
        dim_why = f"{null_dim:g} (given)"
    nopts = dict(null=mnull, null_dim=null_dim, null_draws=null_draws, null_level=null_level,
                 null_seed=null_seed, regimes=regimes, dk_plateau_below=dk_plateau_below,
                 dk_forgetting_above=dk_forgetting_above, rotation=rotation)
    if source == "band":
        bt = run.band
        if not len(bt["step"]):
            raise RunTooShortError(f"{where}: the run has no recorded updates (empty run); train "
                                   "at least W steps with the recorder attached")
        chunk = _stream_chunk(run, bt, chunk_steps, memory_budget)
        opts = dict(n_params=run.n_params or None, rel_floor=rel_floor, plateau_below=plateau_below,
                    forgetting_above=forgetting_above, where=where, **nopts)
        if chunk is None:
            table = analyze_band(bt["band"], bt["lr"], bt["step"], window, **opts)
        else:
            table = band_table_chunked(_band_reader(bt), bt["step"], _band_width(run, bt), window,
                                       chunk_windows=chunk, **opts)
        conv_src = "band (exact float64 inner products)" if run.meta.get("recorder", {}).get("mode") != "projected" \
            else f"band of sign-fold projections, d={run.meta['recorder'].get('proj_dim')}"
    elif source == "snapshots":
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
        table = analyze_band(band, lr, snap["step"], window, n_params=run.n_params or None, rel_floor=rel_floor,
                             plateau_below=plateau_below, forgetting_above=forgetting_above, where=where, **nopts)
        conv_src = f"stored {run.meta.get('recorder', {}).get('snapshot_kind', 'raw')} update snapshots"
    else:
        raise PhasewatchError(f"source={source!r}: use 'band' or 'snapshots'")
    layer_tabs: dict[str, dict[str, np.ndarray]] = {}
    if layers:
        from .layers import run_layer_tables

        lopts = dict(rel_floor=rel_floor, plateau_below=plateau_below, forgetting_above=forgetting_above,
                     where=where, **nopts)
        layer_tabs = run_layer_tables(run, run.band, window, chunk_steps, memory_budget, table_fn=band_table_chunked,
                                      chunk_default=CHUNK_WINDOWS, **lopts)

    flags = run.steps.get("flags")
    if flags is not None and np.any(flags):
        bad = run.steps["step"][flags != 0]
        warns.append(f"{bad.size} steps flagged non-finite (first at step {int(bad[0])}); "
                        "windows containing a non-finite update are marked invalid")
    n_invalid = int((~table["valid"]).sum())
    if n_invalid:
        warns.append(f"{n_invalid} of {table['valid'].size} windows invalid (non-finite updates, or "
                        "the start of a resumed segment)")

    metrics = run.metrics()
    events: list[Event] = []
    name = grok_metric or next((m for m in ("test_acc", "test_accuracy", "val_acc", "eval_accuracy")
                                if m in metrics), None)
    if name and name in metrics:
        s, v = metrics[name]
        ev = first_crossing(s, v, grok_threshold, name, kind="grokking")
        if ev:
            events.append(ev)
        events.extend(jumps(s, v, metric=name))
    probes: dict[str, np.ndarray] = {}
    if "grad_samples" in run.meta.get("tables", {}):
        gs = run.table("grad_samples")
        if len(gs["step"]):
            probes = noise_table(gs, **gradcov.measurement_inputs(gs, run.steps, run.meta))
            if "grad_proj" in run.meta.get("tables", {}):
                probes.update(gradcov.coordinate_columns(run.table("grad_proj"), probes["step"]))
    tail_index: dict[str, np.ndarray] = {}
    gn, gn_input = _tail_norms(run.steps)
    if gn is not None and len(gn) >= 100:
        rh = tails.rolling_hill(gn, window=100, fraction=0.1, input_description=gn_input)
        tail_index = {"step": run.steps["step"][rh.ends], "alpha": rh.alpha,
                      "alpha_lo": rh.ci[:, 0], "alpha_hi": rh.ci[:, 1],
                      "alpha_degenerate": rh.degenerate, "alpha_tied_fraction": rh.tied_fraction,
                      "C_levy": gradcov.levy_rolling(gn, window=100).C}
        warns.extend(f"tail index ({gn_input}): {f}" for f in rh.flags)
    curvature = _curvature(run, probes, tail_index)
    conventions = {
        "alpha": f"Hill MLE on the top 10% of the last 100 {gn_input} (the note's choice), exact chi2 CI; "
                 "alpha > 2: no evidence of a stable heavy tail; alpha_degenerate: the window's top 11 hold an "
                 "atom or near-ties (e.g. clipped norms), alpha NaN, alpha_tied_fraction of the window in it",
        "C": "canonical (||g_bar||^2 - T/n)/T with delta-method CI; C_naive = ||g_bar||^2/T; "
             "C_per_example = C/b; B_simple = 1/C_per_example; C_batch = B*C_per_example (B the training "
             "batch: Recorder(batch_size), else b*n for micro-batch/per-rank samples), p_batch = C_batch/(1+C_batch)",
        "C_langevin": "B ||g_bar||^2/(eta^2 b T) (= ||g||^2/(2DP), D = eta^2 sigma^2/(2B)), delta-method CI; units "
                      "1/eta^2; eta = lr of param group 0 at the measurement step; B = Recorder(batch_size), else "
                      "b*n for micro-batch/per-rank samples, else NaN",
        "C_levy": "levy variant per step (tail_index): window of the last 100 gradient norms, Hill alpha on the top "
                  "10% clipped to [1.1, 1.9], D = (std/||g_t||)^alpha, C = ||g_t||^2/(2 D 100) (divides by the "
                  "window length, as the note does); units of ||g||^2",
        "cov": "sample covariance of the gradient samples: cov_top = lambda_1, cov_top_fraction = lambda_1/Tr, "
               "cov_eff_rank = Tr^2/Tr(Sigma^2) (plug-in, <= n-1), cov_eff_rank_corrected = ratio of "
               "Gaussian-unbiased estimates of Tr^2 and Tr(Sigma^2)",
        "alpha_coord": "pooled Hill (top 10%) of the grad_proj noise coordinates, each divided by its median "
                       "|x| first; 95% percentile bootstrap over samples; alpha > 2: no evidence of a stable "
                       "heavy tail",
        "source": conv_src,
        "kstar": "argmax_j sigma_j/sigma_{j+1} (plain); kstar_weighted: (sigma_j/sum sigma)*(sigma_j/sigma_{j+1})",
        "gap": "sigma_k* - sigma_k*+1; gap_ratio sigma_k*/sigma_k*+1; g23 = lambda_2 - lambda_3",
        "A": "canonical ||Delta C||_F/(eta g^2) (the paper's; units 1/eta: halves when the learning rate doubles), "
             "C = sum u u^T over the window; A_eigen: eigenvalue-change proxy",
        "A_dk": "||Delta C||_F/(lambda_k* - lambda_k*+1) (dimensionless; Davis-Kahan: sin theta of the top-k* "
                "subspace between consecutive windows <~ A_dk)",
        "regime": (f"on A_dk: 0 plateau (A_dk<{dk_plateau_below:g}: sin theta <= {dk_plateau_below:g} per step), "
                   f"1 transition, 2 forgetting (A_dk>{dk_forgetting_above:g}: the rotation bound is vacuous), "
                   "-1 undefined" if regimes == "A_dk" else
                   f"on A (units 1/eta): 0 plateau (A<{plateau_below:g}), 1 transition, 2 forgetting "
                   f"(A>{forgetting_above:g}), -1 undefined")
                  + f"; regime_A: the paper's A with {plateau_below:g} / {forgetting_above:g}",
        "null": mnull.describe() + "; G0[a,b] = |u_a||u_b| rho(|a-b|) with the window's own update norms; "
                "gap_ratio_null = sigma0_k*/sigma0_k*+1 at the observed k*, gap_excess = gap_ratio/gap_ratio_null, "
                "g23_excess = g23/(lambda0_2 - lambda0_3); above_null: gap_ratio > gap_ratio_null_hi, the "
                + (f"{null_level:g} quantile of the max gap ratio of filtered Gaussian noise in d_eff coordinates "
                   f"(analytic to first order at d_eff >= {nulls.FIRST_ORDER_DIM:g} with one clear maximum; else "
                   f"over {null_draws} seeded (seed {null_seed}) draws, exact Wishart ones where first order "
                   f"fails and the reading is within x{nulls.EXACT_NEAR:g} of the band), d_eff = {dim_why}"
                   if null_draws > 0 and (callable(null_dim) or math.isfinite(null_dim))
                   else "null itself (no finite-dimension band)"),
        "rotation": "largest principal angle (radians; rotation_sin its sine) between the top-k* right singular "
                    "subspaces of the window and the one a row before it, k* of the later window, from the band's "
                    "cross inner products (needs K >= W+1: NaN otherwise, and in the first window of a trajectory)"
                    + ("" if rotation else "; not computed here (rotation=False): NaN"),
        **({"layers": "per layer group: the same table from the group's own recorded band, P and d_eff of the null = "
                      "the group's recorded dim; lock-in: the first step starting "
                      "5 consecutive valid windows above the null's band"} if layers else {}),
        "stability": "s_j = 1 - ||Delta C||_F^2 / gap_j^2, gap_j = min_k |lambda_j - lambda_k| (canonical Delta C)",
        "S": "threshold - lambda_max (2/eta for GD; 2(1+beta)/eta heavy-ball; Adam: (2+2b1)/((1-b1)eta_t) against "
             "the preconditioned sharpness lambda_max(D^-1 H)); lambda_max by Lanczos to residual <= tol*|lambda|",
        "eta_opt": "2D/lambda_max with D = 1 (the largest stable step; reported, not acted on)",
        "ntk_rho": "sum of ln(eigenvalues) of K = J J^T/n above 1e-6 * lambda_1; ntk_rate = backward difference per step",
        "phi": "exp(-[(C-1)^2/(2*0.3^2) + S^2/(2*0.15^2) + (r-1)^2/(2*0.5^2)]), r = d rho/dt (note 001); "
               "all_critical: 0.8<=C<=1.2, |S|<=0.1, |r|>0.5; C here is C_crit = C_batch (training batch) where "
               "the batch size is known, else the probe's C_b; C, alpha: latest measurement at or before the probe",
        "I": "p*S/min(d, alpha) (note 000; the framework's heuristic)",
        "bbp": "sigma1_over_dcrit = sigma_1/d_crit (DEFINITIONS); sigma1_over_edge = sigma_1/noise edge (~1 on noise)",
    }
    interventions: dict[str, np.ndarray] = {}
    if "interventions" in run.meta.get("tables", {}):
        iv = run.table("interventions")
        if len(iv["step"]):
            interventions = {k: (np.char.decode(v, "utf-8", "replace").astype(str) if v.dtype.kind == "S"
                                 else np.asarray(v)) for k, v in iv.items()}
    null_info = {"kind": mnull.kind, "beta": mnull.beta, "rho1": float(mnull.rho(2)[1]), "stride": mnull.stride,
                 "dim": dim_why if callable(null_dim) else null_dim,
                 "draws": int(null_draws) if callable(null_dim) or math.isfinite(null_dim) else 0,
                 "level": float(null_level), "source": mnull.source}
    return Analysis(source=source, window=window, n_params=run.n_params, table=table, scalars=run.steps,
                    metrics=metrics, events=events, conventions=conventions, warnings=warns, probes=probes,
                    tail_index=tail_index, curvature=curvature, interventions=interventions, null=null_info,
                    layers=layer_tabs)


def _band_width(run, bt) -> int:
    """K of a run's band, from its schema (reading no band rows)."""
    spec = run.meta.get("tables", {}).get("band", {}).get("band")
    if spec and len(spec[1]) == 1:
        return int(spec[1][0])
    return int(np.asarray(bt["band"]).shape[-1])


def _stream_chunk(run, bt, chunk_steps: int | None, memory_budget: int | None) -> int | None:
    """Windows per chunk when the band is to be streamed, None to read it whole."""
    if chunk_steps is not None:
        return int(chunk_steps)
    if memory_budget is None or not hasattr(bt, "rows"):
        return None  # no budget, or a table that is in memory already
    need = len(bt["step"]) * (_band_width(run, bt) + 2) * 8
    return CHUNK_WINDOWS if need > memory_budget else None


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


def _curvature(run, probes: dict, tail_index: dict) -> dict[str, np.ndarray]:
    """The per-probe curvature table of a run: its own probes plus post-hoc ones (``phasewatch
    curvature`` writes them to a run beside it; see :func:`posthoc_path`)."""
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
    return cv.curvature_columns(hess, ntk, probes, tail_index, lr_steps=st.get("step"),
                                lr_values=(st["lr"][:, 0] if "lr" in st and len(st["lr"]) else None),
                                threshold_fn=threshold_fn)


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
