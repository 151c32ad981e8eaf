"""The simple gradient noise scale ``B_simple`` of McCandlish et al. (2018), two ways.

S. McCandlish, J. Kaplan, D. Amodei and the OpenAI Dota Team, *An Empirical Model of Large-Batch
Training*, arXiv:1812.06162 (2018): ``B_simple = Tr(Sigma_1) / ||mu||^2`` (their eq. 2.8), here
the inverse of the canonical per-example consolidation ratio (:func:`noise_scale`), and the
two-batch-size estimator of their Appendix A.1 (:func:`noise_scale_two_batch`).  Units: examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from phasewatch.errors import PhasewatchError

from ._checks import check_level as _check_level
from ._checks import rng as _rng
from .consolidation import CIKind, consolidation_ratio
from .gradient_stats import _as_out, _check_n_boot, _percentile_ci
from .result import Estimate


@dataclass(frozen=True, eq=False)
class NoiseScaleResult(Estimate):
    """Simple gradient noise scale ``B_simple = Tr(Sigma_1) / ||mu||^2`` (in examples).

    Attributes:
        B_simple
            ``1 / C_1`` (``inf`` when the signal is not resolved).
        ci
            ``(2,)`` (or ``(..., 2)``) interval, the image of the ``C_1`` interval under
            ``1/x`` (an upper end of ``inf`` when ``C_1``'s lower end is 0).
        C_per_example
            ``C_1 = C_b / b`` (canonical).
        b, n, ci_method, level, flags
            As in :class:`ConsolidationResult`.
        variant
            ``"simple"``.
    """

    _statistic_field = "B_simple"  # statistic / confidence_interval: Estimate
    _interval_field = "ci"

    B_simple: float | np.ndarray
    ci: np.ndarray
    C_per_example: float | np.ndarray
    b: float | np.ndarray
    n: int | np.ndarray
    ci_method: str
    level: float
    flags: tuple[str, ...]
    variant: str = "simple"


def _inv(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(x == 0, np.inf, 1.0 / x)


def noise_scale(
    samples: ArrayLike | None = None,
    *,
    n: int | ArrayLike | None = None,
    b: float | ArrayLike = 1,
    mean_sq_norm: float | ArrayLike | None = None,
    trace: float | ArrayLike | None = None,
    quad: float | ArrayLike | None = None,
    trace_sq: float | ArrayLike | None = None,
    fourth: float | ArrayLike | None = None,
    third: float | ArrayLike | None = None,
    ci: CIKind = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int | np.random.Generator | None = None,
) -> NoiseScaleResult:
    """Simple gradient noise scale ``B_simple = Tr(Sigma_1) / ||mu||^2 = 1 / C_1``.

    McCandlish, Kaplan, Amodei et al., *An Empirical Model of Large-Batch Training*
    (arXiv:1812.06162, 2018), eq. 2.8; DEFINITIONS §2. ``Sigma_1`` is the
    per-example gradient covariance and ``mu`` the true gradient. Estimated as the
    inverse of the canonical per-example consolidation ratio
    ``C_1 = (A - T/n) / (b T)`` of :func:`consolidation_ratio` (same inputs, same
    interval methods); the interval is the image of ``C_1``'s interval under the
    decreasing map ``1/x``.

    Units: examples (a batch size). ``inf`` when the bias-corrected signal is
    ``<= 0`` (flagged).

    Returns:
        :class:`NoiseScaleResult`.

    Examples:
        The three samples of :func:`~phasewatch.analysis.consolidation.consolidation_ratio`'s example:
        ``C_1 = 11/12`` (``b = 1``), so ``B_simple = 12/11``.

        >>> import numpy as np
        >>> r = noise_scale(np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]]), ci="none")
        >>> bool(abs(r.B_simple - 12 / 11) < 1e-15)
        True
    """
    r = consolidation_ratio(
        samples,
        n=n,
        b=b,
        mean_sq_norm=mean_sq_norm,
        trace=trace,
        quad=quad,
        trace_sq=trace_sq,
        fourth=fourth,
        third=third,
        variant="canonical",
        ci=ci,
        level=level,
        n_boot=n_boot,
        seed=seed,
    )
    C1 = np.asarray(r.C_per_example)
    ci1 = np.asarray(r.ci) / np.asarray(r.b)[..., None]
    Bs = _inv(C1)
    ci_B = np.stack([_inv(ci1[..., 1]), _inv(ci1[..., 0])], axis=-1)
    return NoiseScaleResult(
        B_simple=_as_out(Bs),
        ci=ci_B,
        C_per_example=r.C_per_example,
        b=r.b,
        n=r.n,
        ci_method=r.ci_method,
        level=r.level,
        flags=r.flags,
    )


@dataclass(frozen=True, eq=False)
class TwoBatchNoiseScale(Estimate):
    """Two-batch-size estimate of ``B_simple`` (McCandlish et al. 2018, App. A.1).

    Attributes:
        B_simple
            ``mean(S) / mean(|G|^2)`` over measurements (examples).
        ci
            ``(2,)`` percentile-bootstrap interval over measurements (NaN for one
            measurement).
        grad_sq, trace
            The averaged estimates of ``|G|^2 = ||mu||^2`` and ``S = Tr(Sigma_1)``.
        grad_sq_each, trace_each
            Per-measurement estimates.
        b_small, b_big, n_measurements, level, flags
            Inputs and warnings.
        ci_method, variant
            ``"bootstrap"`` (or ``"none"``) and ``"two_batch"``.
    """

    _statistic_field = "B_simple"  # statistic / confidence_interval: Estimate
    _interval_field = "ci"

    B_simple: float
    ci: np.ndarray
    grad_sq: float
    trace: float
    grad_sq_each: np.ndarray
    trace_each: np.ndarray
    b_small: float
    b_big: float
    n_measurements: int
    level: float
    flags: tuple[str, ...]
    ci_method: str = "bootstrap"
    variant: str = "two_batch"


def noise_scale_two_batch(
    g_small_sq: float | ArrayLike,
    g_big_sq: float | ArrayLike,
    b_small: float,
    b_big: float,
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int | np.random.Generator | None = None,
) -> TwoBatchNoiseScale:
    """``B_simple`` from squared norms of batch gradients at two batch sizes.

    McCandlish, Kaplan, Amodei et al., *An Empirical Model of Large-Batch Training*
    (arXiv:1812.06162, 2018), Appendix A.1: since
    ``E||g_B||^2 = |G|^2 + Tr(Sigma_1) / B`` for a batch of ``B`` i.i.d. examples,

    ``|G|^2 ~= (B_big ||g_big||^2 - B_small ||g_small||^2) / (B_big - B_small)``,
    ``S ~= (||g_small||^2 - ||g_big||^2) / (1/B_small - 1/B_big)``,

    both unbiased, and ``B_simple = S / |G|^2``. As the paper recommends, ``S`` and
    ``|G|^2`` are averaged over measurements *separately* before taking the ratio
    (each alone is very noisy). The interval is a percentile bootstrap over
    measurements (resampling the ``(small, big)`` pairs), assuming independent
    measurements. Non-finite pairs are dropped (flagged).

    Parameters:
        g_small_sq, g_big_sq
            ``||g_small||^2`` and ``||g_big||^2`` per measurement (same shape).
        b_small, b_big
            The two batch sizes, ``0 < b_small < b_big``.

    Returns:
        :class:`TwoBatchNoiseScale`; ``B_simple = inf`` (flagged) when the averaged
        ``|G|^2 <= 0``.

    Examples:
        ``|G|^2 = 1``, ``S = 8``: ``E||g_B||^2 = 1 + 8/B`` is 5 at ``B = 2`` and 2 at ``B = 8``.

        >>> r = noise_scale_two_batch([5.0], [2.0], 2, 8)
        >>> r.grad_sq, r.trace, r.B_simple, r.flags
        (1.0, 8.0, 8.0, ('one measurement: no interval',))
    """
    level = _check_level(level)
    gs = np.asarray(g_small_sq, dtype=np.float64).ravel()
    gb = np.asarray(g_big_sq, dtype=np.float64).ravel()
    if gs.shape != gb.shape:
        raise PhasewatchError(f"g_small_sq and g_big_sq need the same length, got {gs.size} and {gb.size}")
    bs, bb = float(b_small), float(b_big)
    if not (0 < bs < bb and np.isfinite(bb)):
        raise PhasewatchError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    flags: list[str] = []
    ok = np.isfinite(gs) & np.isfinite(gb)
    if not ok.all():
        flags.append(f"dropped {int((~ok).sum())} non-finite measurements")
        gs, gb = gs[ok], gb[ok]
    M = gs.size
    if M == 0:
        raise PhasewatchError("noise_scale_two_batch: no finite measurements")
    G2 = (bb * gb - bs * gs) / (bb - bs)
    S = (gs - gb) / (1.0 / bs - 1.0 / bb)
    G2m, Sm = float(G2.mean()), float(S.mean())

    def ratio(s: np.ndarray, g: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(g > 0, s / g, np.inf)

    B = float(ratio(np.asarray(Sm), np.asarray(G2m)))
    if G2m <= 0:
        flags.append("averaged |G|^2 estimate <= 0: signal not resolved, B_simple = inf")
    if Sm <= 0:
        flags.append("averaged S = Tr(Sigma) estimate <= 0: noise not resolved")
    if M >= 2:
        rng = _rng(seed)
        idx = rng.integers(0, M, size=(_check_n_boot(n_boot), M))
        Bb = ratio(S[idx].mean(axis=1), G2[idx].mean(axis=1))
        ci_arr = np.array(_percentile_ci(Bb, level))
        method = "bootstrap"
    else:
        ci_arr = np.array([np.nan, np.nan])
        method = "none"
        flags.append("one measurement: no interval")
    return TwoBatchNoiseScale(
        B_simple=B,
        ci=ci_arr,
        grad_sq=G2m,
        trace=Sm,
        grad_sq_each=G2,
        trace_each=S,
        b_small=bs,
        b_big=bb,
        n_measurements=int(M),
        level=level,
        flags=tuple(flags),
        ci_method=method,
    )
