"""Gradient noise (DEFINITIONS §2 and the §6 rules on its readings): a facade over one module each.

Every name this module has always offered is re-exported from where it now lives:

:mod:`phasewatch.analysis.gradient_stats`
    The data convention and :func:`sufficient_statistics` of a measurement of gradient samples.
:mod:`phasewatch.analysis.consolidation`
    :func:`consolidation_ratio` (canonical, naive, Langevin, Lévy) with its intervals.
:mod:`phasewatch.analysis.noise_scale`
    :func:`noise_scale` and :func:`noise_scale_two_batch` (McCandlish et al. 2018).
:mod:`phasewatch.analysis.phases`
    :func:`phases`, :func:`decision_bands`, :func:`early_stopping_flags`, :func:`logistic_forecast`.

Pure numpy/scipy; every random choice goes through an explicit seed or ``numpy.random.Generator``.
Units: ``||g||^2`` and ``T`` are in (loss / parameter)^2; ``C_b``, ``C_1``, ``p`` and the odds are
dimensionless; ``B_simple`` is a number of examples; the ``langevin`` and ``levy`` variants are
not dimensionless.
"""

from __future__ import annotations

from .consolidation import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _VARIANTS,
    FLAG_UNRESOLVED,
    LEVY_ALPHA_RANGE,
    LEVY_MIN_WINDOW,
    LEVY_TOP_FRACTION,
    CIKind,
    ConsolidationResult,
    Variant,
    _bootstrap_ratio,
    _delta_var_log_ratio_gaussian_bound,
    _delta_var_log_ratio_moments,
    _finish,
    _levy,
    _prob,
    consolidation_ratio,
    levy_terms,
)
from .gradient_stats import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    SufficientStatistics,
    _as_out,
    _check_b,
    _check_n_boot,
    _clean_samples,
    _Gram,
    _gram_stats,
    _percentile_ci,
    sufficient_statistics,
)
from .noise_scale import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    NoiseScaleResult,
    TwoBatchNoiseScale,
    _inv,
    noise_scale,
    noise_scale_two_batch,
)
from .phases import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _UNDEFINED,
    BAND_LABELS,
    PHASE_LABELS,
    EarlyStoppingFlags,
    LogisticForecast,
    _first,
    _logistic,
    _run_length,
    decision_band,
    decision_bands,
    early_stopping_flags,
    logistic_forecast,
    phase,
    phases,
)

__all__ = [
    "FLAG_UNRESOLVED",
    "PHASE_LABELS",
    "BAND_LABELS",
    "SufficientStatistics",
    "sufficient_statistics",
    "ConsolidationResult",
    "consolidation_ratio",
    "NoiseScaleResult",
    "noise_scale",
    "TwoBatchNoiseScale",
    "noise_scale_two_batch",
    "phase",
    "phases",
    "decision_band",
    "decision_bands",
    "EarlyStoppingFlags",
    "early_stopping_flags",
    "LogisticForecast",
    "logistic_forecast",
]
