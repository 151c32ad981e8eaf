"""The run format: every name, dtype and attribute of a phasewatch run, in one place.

A run is a directory::

    RUN/meta.json              self-describing metadata (atomic write: temp file + rename)
    RUN/segment-000000.h5      HDF5 segments; a closed segment is never written again
    RUN/segment-000001.h5      (rotation every N rows or minutes, and on every resume)

or one packed file (``phasewatch pack``) whose ``/segments/NNNNNN`` groups hold the segments.

Each segment holds one group per *table*.  A table is a set of columnar, chunked, resizable
datasets that grow together, plus a one-element ``committed_rows`` dataset written after the
data has been flushed: readers trust ``committed_rows`` and ignore anything beyond it.
Segments are written in HDF5 SWMR mode, so a reader can open them while training runs and a
killed writer leaves a file whose committed rows are intact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_NAME = "phasewatch-run"
PACKED_FORMAT_NAME = "phasewatch-packed-run"
SCHEMA_VERSION = 1
META_FILE = "meta.json"
SEGMENT_GLOB = "segment-*.h5"
COMMITTED = "committed_rows"
PACKED_SEGMENTS = "segments"


def segment_name(index: int) -> str:
    return f"segment-{index:06d}.h5"


def posthoc_path(run_path: str | os.PathLike) -> Path:
    """Where post-hoc probes of a run live (``phasewatch curvature`` writes them, the analyzer
    merges them): ``RUN/posthoc`` for a run directory, ``RUN.posthoc`` beside a packed file."""
    p = Path(run_path)
    return p / "posthoc" if p.is_dir() else p.with_name(p.name + ".posthoc")


# Bits of the per-step ``flags`` column.
FLAG_LOSS_NONFINITE = 1
FLAG_GRAD_NONFINITE = 2
FLAG_UPDATE_NONFINITE = 4
FLAG_NAMES = {
    FLAG_LOSS_NONFINITE: "loss not finite",
    FLAG_GRAD_NONFINITE: "gradient not finite",
    FLAG_UPDATE_NONFINITE: "update not finite",
}


@dataclass(frozen=True)
class Column:
    """One dataset of a table: dtype and the shape of one row (``()`` for a scalar column)."""

    dtype: str
    shape: tuple[int, ...] = ()

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, *self.shape), dtype=self.dtype)


@dataclass(frozen=True)
class TableSpec:
    """A table: named columns that grow together; ``step`` is always the first column."""

    name: str
    columns: dict[str, Column] = field(default_factory=dict)

    def chunk_rows(self) -> int:
        row_bytes = max(
            1,
            sum(int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize
                for c in self.columns.values()),
        )
        # aim for chunks of ~256 KiB, between 1 and 1024 rows
        return int(min(1024, max(1, (256 * 1024) // row_bytes)))


def steps_table(n_layers: int, n_lr_groups: int, unclipped: bool = False) -> TableSpec:
    """Per optimizer step: scalars that cost O(P) at most.

    ``grad_norm`` is the norm of the gradient the optimizer uses (after clipping and unscaling).
    ``grad_norm_unclipped`` (the recorder declares it; runs recorded before it existed lack it):
    the norm before clipping where the recorder was given it (``Recorder.unclipped_grad_norm``,
    the HF and Lightning callbacks), NaN at other steps.
    """
    return TableSpec(
        "steps",
        {
            "step": Column("i8"),
            "wall_time": Column("f8"),
            "loss": Column("f8"),
            "lr": Column("f8", (n_lr_groups,)),
            "grad_norm": Column("f8"),
            "layer_grad_norm": Column("f8", (n_layers,)),
            "update_norm": Column("f8"),
            "flags": Column("i4"),
            **({"grad_norm_unclipped": Column("f8")} if unclipped else {}),
        },
    )


def band_table(n_layers: int, k: int) -> TableSpec:
    """Per recorded update u_t: the band b_t[j] = <u_t, u_{t-j}>, j < K, global and per layer."""
    return TableSpec(
        "band",
        {
            "step": Column("i8"),
            "lr": Column("f8"),
            "band": Column("f8", (k,)),
            "layer_band": Column("f8", (n_layers, k)),
        },
    )


def metrics_table() -> TableSpec:
    """Evaluation metrics logged by the user at any steps, in long form (step, name, value)."""
    return TableSpec(
        "metrics",
        {"step": Column("i8"), "name": Column("S64"), "value": Column("f8")},
    )


def snapshots_table(dim: int, dtype: str) -> TableSpec:
    """Update vectors u_t (raw, or projected to ``dim`` coordinates) at scheduled steps."""
    return TableSpec("snapshots", {"step": Column("i8"), "update": Column(dtype, (dim,))})


def checkpoints_table(n_params: int, dtype: str) -> TableSpec:
    """Flattened parameters θ_t at scheduled steps, in the order of ``meta['model']['params']``."""
    return TableSpec("checkpoints", {"step": Column("i8"), "theta": Column(dtype, (n_params,))})


GRAD_SOURCES = ("per_example", "micro_batch", "per_rank")


def grad_samples_table(n_layers: int, n_max: int, cov_eigs: bool = False) -> TableSpec:
    """Sufficient statistics of n gradient samples at (nearly) one θ, each a mean over b examples
    (``phasewatch.analysis.noise.SufficientStatistics``): one row per measurement.

    ``source`` says where the samples came from (``per_example``: b = 1, on a probe batch after
    the step; ``micro_batch``: the micro-batch gradients of gradient accumulation, b = micro-batch
    size or NaN; ``per_rank``: under DDP, each rank's local micro-batch gradients before the
    all-reduce, n = ranks × micro-batches, b = per-rank micro-batch size or NaN).  ``layer_mean_sq_norm`` and ``layer_trace`` are per layer group (they add up to
    the global values); ``sample_norms`` are the first ``n_max`` sample norms, NaN-padded.
    ``cov_eigs`` (the recorder declares it; runs recorded before it existed lack it): the top
    ``n_max`` eigenvalues of the sample covariance Σ̂ = Σ(g_i − ḡ)(g_i − ḡ)ᵀ/(n−1), descending,
    at most n−1 of them (the eigenvalues of K/(n−1), K the centred n×n Gram), NaN-padded.
    """
    return TableSpec(
        "grad_samples",
        {
            "step": Column("i8"),
            "n": Column("i8"),
            "b": Column("f8"),
            "source": Column("S16"),
            "mean_sq_norm": Column("f8"),
            "trace": Column("f8"),
            "quad": Column("f8"),
            "trace_sq": Column("f8"),
            "fourth": Column("f8"),
            "third": Column("f8"),
            "layer_mean_sq_norm": Column("f8", (n_layers,)),
            "layer_trace": Column("f8", (n_layers,)),
            "sample_norms": Column("f8", (n_max,)),
            **({"cov_eigs": Column("f8", (n_max,))} if cov_eigs else {}),
        },
    )


def grad_proj_table(n_max: int, d: int) -> TableSpec:
    """Projected gradient samples (declared only with ``Recorder(grad_proj_dim=d)``), one row per
    measurement of ``grad_samples``: ``n`` finite samples, ``mean`` = R ḡ (d,) and ``samples`` =
    R(g_i − ḡ) for the first min(n, n_max) samples (centred, float32, NaN-padded to (n_max, d)); the
    raw projections are ``samples + mean``.  R is the run's ``recorder.grad_proj`` projection:
    ``coords`` (d exact coordinates, their flat indices in the metadata) or ``gaussian`` (a seeded
    d × P sketch, N(0, 1/d) entries; see ``phasewatch.record.probes.SampleProjector``).
    """
    return TableSpec(
        "grad_proj",
        {"step": Column("i8"), "n": Column("i8"), "mean": Column("f8", (d,)), "samples": Column("f4", (n_max, d))},
    )


def curvature_table(top_k: int, hvp: bool = True, groups: int = 0) -> TableSpec:
    """Curvature probes on the fixed probe batch (DEFINITIONS §4): one row per probe.

    ``eigenvalues``/``residuals``: the top-k Hessian eigenvalues (largest algebraic, descending)
    and their measured Ritz residuals ‖Hy − θy‖; ``hvps`` Hessian-vector products used by Lanczos
    (verification and the ``hvp_check`` included; an FD product is two gradient evaluations), ``converged`` 1/0.  ``trace*``: Hutchinson estimate, its Student-t
    interval, standard error and probe count (NaN/0 if not asked for).  ``pre_lambda`` and
    ``pre_residual``: the preconditioned sharpness λ_max(D⁻¹H) of Adam-type optimizers (NaN
    otherwise).  ``threshold``: the optimizer's stability threshold at the probe (units 1/η) for
    the quantity named in ``threshold_of`` (``lambda_max`` or ``preconditioned``).  ``mode``:
    the model mode the loss was evaluated in (``train``/``eval``).  ``hvp``: how the
    Hessian-vector products were computed (``autograd`` double backward or ``fd`` central
    differences of gradients); ``hvp_check``: under ``hvp="auto"``, ‖H_fd y − H_ag y‖/|λ_max| along the
    top eigenvector, the two routes' measured disagreement (NaN when not measured).
    ``u_curvature``: uᵀHu/uᵀu along the step's update u_t = θ_t − θ_{t−1} (NaN when the recorder
    does not hold u_t exactly).  Runs recorded before these three columns (``hvp=False``) lack them
    and read as autograd.  ``group_lambda``/``group_residual`` (only when per-group curvature was
    asked for, ``groups`` = the number of layer groups): λ_max of each group's diagonal Hessian
    block and its measured residual, NaN for groups not asked for; runs without them read as before.
    """
    extra = {"hvp": Column("S8"), "hvp_check": Column("f8"), "u_curvature": Column("f8")} if hvp else {}
    if groups:
        extra.update(group_lambda=Column("f8", (int(groups),)), group_residual=Column("f8", (int(groups),)))
    return TableSpec(
        "curvature",
        {
            "step": Column("i8"),
            "lr": Column("f8"),
            "loss": Column("f8"),
            "mode": Column("S8"),
            "eigenvalues": Column("f8", (top_k,)),
            "residuals": Column("f8", (top_k,)),
            "hvps": Column("i8"),
            "converged": Column("i1"),
            "trace": Column("f8"),
            "trace_lo": Column("f8"),
            "trace_hi": Column("f8"),
            "trace_se": Column("f8"),
            "trace_probes": Column("i8"),
            "pre_lambda": Column("f8"),
            "pre_residual": Column("f8"),
            "threshold": Column("f8"),
            "threshold_of": Column("S16"),
            "seconds": Column("f8"),
            **extra,
        },
    )


def ntk_table(m: int) -> TableSpec:
    """Empirical NTK Gram K = J Jᵀ/n on the fixed probe inputs (DEFINITIONS §5), one row per probe;
    ``method`` says how it was computed (``jacobian`` or ``ntk_vp``)."""
    return TableSpec(
        "ntk",
        {"step": Column("i8"), "gram": Column("f8", (m, m)), "method": Column("S16"), "seconds": Column("f8")},
    )


def interventions_table() -> TableSpec:
    """Changes made by controllers (:mod:`phasewatch.record.control`), one row per change: after step
    ``step`` rule ``rule`` set ``param`` (``param_groups[i].lr``, or ``stop``) from ``old`` to
    ``new`` (a learning rate set after step t is the lr of step t + 1); ``note`` says why (UTF-8,
    cut to 96 bytes; ``dry run: …`` when the controller only tracked what it would have done)."""
    return TableSpec(
        "interventions",
        {"step": Column("i8"), "rule": Column("S32"), "param": Column("S32"), "old": Column("f8"),
         "new": Column("f8"), "note": Column("S96")},
    )
