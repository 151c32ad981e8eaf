"""Heavy-tail estimators (DEFINITIONS §3, "Heavy tails"): a facade over one module per estimator.

Every name this module has always offered is re-exported from where it now lives:

:mod:`phasewatch.analysis.hill_kernel`
    The one Hill kernel (:func:`hill_top`, :func:`top_order_statistics`, the tie rule).
:mod:`phasewatch.analysis.hill`
    :func:`hill` (Hill 1975) with its ``k`` rules, :func:`hill_curve`, :func:`rolling_hill`.
:mod:`phasewatch.analysis.hill_k_selection`
    The ``k`` rules: Clauset, Shalizi & Newman (2009) KS, Danielsson et al. (2001) double bootstrap.
:mod:`phasewatch.analysis.stable_index`
    :func:`stable_index`, the block-sum estimator of Mohammadi, Mohammadpour & Ohta (2015).
:mod:`phasewatch.analysis.mcculloch`
    :func:`mcculloch`, McCulloch's (1986) quantile estimator of a stable law.

What is fed in must be stated by the caller (``input_description``): gradient norms over steps
(the notes' choice), noise coordinates ``g^(i) - g_bar``, or update norms.  The estimators return
``alpha`` in the *tail-index* convention (Pareto survival ``x^{-alpha}``; Clauset's density
exponent is ``alpha + 1``).  Non-finite inputs are dropped and counted in ``flags``; randomness
only through ``seed`` (an int, ``None`` for fresh OS entropy, or a ``numpy.random.Generator``).
"""

from __future__ import annotations

from .hill import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _CI_METHODS,
    _MIN_HILL_VALUES,
    _MIN_SELECTION_VALUES,
    _RULES,
    FLAG_FEW_TAIL_SAMPLES,
    FLAG_HILL_UNSTABLE,
    FLAG_NO_HEAVY_TAIL,
    UNSTABLE_SPREAD,
    HillCI,
    HillCurve,
    HillResult,
    HillRule,
    RollingHill,
    _degenerate_hill,
    hill,
    hill_curve,
    rolling_hill,
)
from .hill_k_selection import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _DB_CHUNK_ELEMENTS,
    _DB_EPS,
    _KS_GRID,
    _KS_REFINE,
    _db_argmin_q,
    _double_bootstrap_select,
    _ks_one,
    _ks_select,
)
from .hill_kernel import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _CONVENTIONS,
    _SORT_MAX,
    _TIE_LOOP_MAX,
    MIN_TAIL_SAMPLES,
    TIE_FALSE_RATE,
    TIE_RTOL,
    HillConvention,
    HillTop,
    _alpha_from_sums,
    _desc_logs,
    _dropped_flag,
    _finite_abs,
    _log_sums,
    _tie_groups,
    hill_top,
    tie_reason,
    tied_fraction,
    top_order_statistics,
)
from .mcculloch import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _MC_ALPHAS,
    _MC_BETAS,
    _MC_IQR,
    _MC_MED,
    _MC_NU_A,
    _MC_NU_B,
    _MIN_MCCULLOCH_VALUES,
    McCullochResult,
    _build_mcculloch_table,
    _mcculloch_splines,
    _solve_monotone,
    mcculloch,
)
from .stable_index import (  # noqa: F401  (re-exported, private names included: modules and tests import them from here)
    _MIN_STABLE_VALUES,
    StableIndexResult,
    stable_index,
)

__all__ = [
    "HillResult",
    "HillCurve",
    "StableIndexResult",
    "McCullochResult",
    "HillTop",
    "hill",
    "hill_curve",
    "hill_top",
    "top_order_statistics",
    "tied_fraction",
    "tie_reason",
    "RollingHill",
    "rolling_hill",
    "TIE_RTOL",
    "stable_index",
    "mcculloch",
    "FLAG_NO_HEAVY_TAIL",
    "FLAG_HILL_UNSTABLE",
    "FLAG_FEW_TAIL_SAMPLES",
]
