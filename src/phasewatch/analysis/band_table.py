"""The per-window table of a band: spectra, k*, gaps, A, A_dk, regimes, rotation and the momentum
null's columns, computed chunk by chunk (:func:`band_table_chunked`) so that memory stays bounded and
the table is the same, value for value, for every chunking.  The spectra stage of
:func:`~phasewatch.analysis.pipeline.analyze` and the per-layer tables (:mod:`.layers`) call it."""

from __future__ import annotations

import logging
import math
import sys
import warnings

import numpy as np

from ..errors import PhasewatchError, RunTooShortError
from . import adiabatic as adia
from . import gram, nulls
from . import rotation as rotating
from .null_stage import window_null_columns

log = logging.getLogger("phasewatch")

#: Windows per chunk of :func:`band_table_chunked` (and of a streamed band in ``analyze``).
CHUNK_WINDOWS = 100_000


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
    _check_table_args(window, K, T, regimes, chunk_windows, where)
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
        part = _chunk_columns(sub, sub_lr, steps, lo, start, window, n_params=n_params, rel_floor=rel_floor,
                              plateau_below=plateau_below, forgetting_above=forgetting_above, regimes=regimes,
                              dk_plateau_below=dk_plateau_below, dk_forgetting_above=dk_forgetting_above,
                              rotation=rotation, null=null, null_dim=null_dim, null_draws=null_draws,
                              null_level=null_level, null_seed=null_seed)
        if not out:  # the table is allocated once: no concatenation (no second copy) at the end
            out = {k: np.empty((n_win, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        at = start - (window - 1)
        for k, v in part.items():
            out[k][at: at + len(v)] = v
        n_kept = len(part["step"])
        del sub, part
        if bar is not None:
            bar.update(n_kept)
    if bar is not None:
        bar.close()
    return out


def _chunk_columns(sub, sub_lr, steps, lo, start, window, *, n_params, rel_floor, plateau_below, forgetting_above,
                   regimes, dk_plateau_below, dk_forgetting_above, rotation, null, null_dim, null_draws, null_level,
                   null_seed) -> dict[str, np.ndarray]:
    """The columns of the windows of one chunk ``sub`` (global band rows ``lo ..``) that end at or after
    row ``start`` (see :func:`band_table_chunked`)."""
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
    return part

def _check_table_args(window: int, K: int, T: int, regimes: str, chunk_windows: int, where: str) -> None:
    """One-line errors for a window, band, run length, regime rule or chunk that cannot make the table."""
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
