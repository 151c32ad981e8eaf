"""McCulloch's (1986) quantile estimator of the four parameters of a stable law.

J. H. McCulloch, "Simple consistent estimators of stable distribution parameters", *Commun.
Statist. Simul.* 15 (1986): ``nu_alpha = (q95 - q05)/(q75 - q25)`` and ``nu_beta = (q95 + q05 -
2 q50)/(q95 - q05)`` of the sample are inverted through tables of the standard stable law
(Nolan's S0 parameterisation) to ``(alpha, beta)``, then the scale from the IQR and the location
from the median.  A fast cross-check of :func:`phasewatch.analysis.hill.hill` and
:func:`phasewatch.analysis.stable_index.stable_index` (``scipy.stats.levy_stable.fit`` takes
minutes and is not called here).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from phasewatch.errors import PhasewatchError

from .hill_kernel import _dropped_flag
from .result import Estimate

_MIN_MCCULLOCH_VALUES = 20


@dataclass(frozen=True)
class McCullochResult(Estimate):
    """McCulloch (1986) quantile estimate of a stable law.

    Attributes:
        alpha
            Stable index, clipped to ``[0.6, 2]``.
        beta
            Skewness, in ``[-1, 1]`` (undetermined, reported 0, when ``alpha = 2``).
        scale
            ``gamma`` (for ``alpha = 2`` the law is ``N(loc, 2 gamma^2)``).
        location
            ``delta`` in Nolan's ``S0`` parameterisation (continuous in ``alpha``; equals
            the ``S1`` location when ``beta = 0``).
        nu_alpha, nu_beta
            The sample statistics ``(q95 - q05) / (q75 - q25)`` and
            ``(q95 + q05 - 2 q50) / (q95 - q05)``.
        n
            Number of finite values used.
        parameterization
            ``"S0"``.
        flags
            Warnings (clipping, dropped values).
        input_description
            What was fed in, as stated by the caller.
    """

    _statistic_field = "alpha"  # statistic / confidence_interval: Estimate
    _interval_field = None

    alpha: float
    beta: float
    scale: float
    location: float
    nu_alpha: float
    nu_beta: float
    n: int
    parameterization: str
    flags: tuple[str, ...]
    input_description: str


# Forward tables of the standard stable law S0(alpha, beta, 1, 0) (Nolan's S0
# parameterisation), rows alpha = 0.60, 0.65, ..., 2.00, columns beta = 0, .25, .5, .75, 1:
#   _MC_NU_A = (q95 - q05) / (q75 - q25)          (McCulloch's nu_alpha)
#   _MC_NU_B = (q95 + q05 - 2 q50) / (q95 - q05)  (nu_beta)
#   _MC_IQR  = q75 - q25                          (nu_c = IQR / scale)
#   _MC_MED  = q50                                (median, location 0, scale 1)
# Generated once by _build_mcculloch_table() with scipy 1.17.1
# (scipy.stats.levy_stable.ppf, parameterization "S0"; about 8 s) and printed to 7
# significant digits. Checks: alpha = 1, beta = 0 gives tan(0.45 pi) = 6.313752 and
# IQR 2 (Cauchy); alpha = 2 gives 2 * 1.644854 / (2 * 0.6744898) = 2.438664 and IQR
# 2 sqrt(2) 0.6744898 = 1.907745 (N(0, 2)); tests re-check entries by Gil-Pelaez inversion.
_MC_ALPHAS = np.round(np.arange(0.6, 2.0 + 1e-9, 0.05), 2)
_MC_BETAS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_MC_NU_A = np.array(
    [
        [23.61219, 21.88027, 18.40706, 16.27917, 15.64278],
        [18.43962, 17.22719, 14.67245, 13.01121, 12.54472],
        [14.89377, 14.00923, 12.07946, 10.75268, 10.40006],
        [12.35752, 11.69136, 10.20423, 9.127343, 8.854966],
        [10.47908, 9.965299, 8.801883, 7.91824, 7.704644],
        [9.047016, 8.643987, 7.723454, 6.993751, 6.824379],
        [7.928492, 7.608806, 6.874376, 6.270575, 6.134886],
        [7.036866, 6.781668, 6.192378, 5.693849, 5.583891],
        [6.313752, 6.109509, 5.635172, 5.225937, 5.135825],
        [5.718676, 5.555282, 5.173265, 4.840266, 4.765816],
        [5.222869, 5.092535, 4.785625, 4.517752, 4.456054],
        [4.805423, 4.702013, 4.456945, 4.244491, 4.193506],
        [4.450851, 4.369468, 4.175875, 4.010192, 3.968464],
        [4.147494, 4.084211, 3.933803, 3.807127, 3.773569],
        [3.88647, 3.838126, 3.724014, 3.629411, 3.603164],
        [3.660946, 3.624968, 3.541134, 3.472519, 3.452847],
        [3.465625, 3.439854, 3.380818, 3.332943, 3.319158],
        [3.296352, 3.278879, 3.239567, 3.207951, 3.199359],
        [3.149795, 3.138836, 3.114597, 3.095422, 3.091285],
        [3.02317, 3.017035, 3.003721, 2.993726, 2.993233],
        [2.914029, 2.911176, 2.905241, 2.901634, 2.90389],
        [2.820128, 2.819267, 2.817832, 2.818248, 2.822292],
        [2.739382, 2.739543, 2.740429, 2.742935, 2.747783],
        [2.669882, 2.670417, 2.672128, 2.675252, 2.679989],
        [2.609914, 2.610456, 2.612094, 2.614856, 2.618753],
        [2.557985, 2.558368, 2.559516, 2.561418, 2.564055],
        [2.512818, 2.513012, 2.513593, 2.514557, 2.515894],
        [2.473342, 2.473395, 2.473552, 2.473813, 2.474179],
        [2.438664, 2.438664, 2.438664, 2.438664, 2.438664],
    ]
)
_MC_NU_B = np.array(
    [
        [0, 0.4408923, 0.7677311, 0.9361581, 0.9620106],
        [0, 0.4122883, 0.7331797, 0.9144732, 0.9459739],
        [0, 0.3865275, 0.6993868, 0.8900172, 0.9269059],
        [0, 0.3630646, 0.6664394, 0.8630916, 0.9049904],
        [0, 0.3414756, 0.6343474, 0.8339698, 0.8804662],
        [0, 0.3214237, 0.6030793, 0.8028579, 0.8536007],
        [0, 0.3026389, 0.5725659, 0.7699052, 0.8246701],
        [0, 0.2849025, 0.5427181, 0.7352594, 0.7939378],
        [0, 0.2680325, 0.5134291, 0.6991848, 0.7616526],
        [0, 0.2518717, 0.4845741, 0.6620306, 0.7280374],
        [0, 0.2362803, 0.4560183, 0.6241406, 0.6932848],
        [0, 0.2211256, 0.4276192, 0.5858143, 0.6575671],
        [0, 0.2062884, 0.3992371, 0.5472871, 0.6210208],
        [0, 0.1916471, 0.3707662, 0.5087479, 0.5837654],
        [0, 0.1770929, 0.3421636, 0.4703422, 0.5458917],
        [0, 0.1625283, 0.3134712, 0.4321777, 0.5074757],
        [0, 0.1478925, 0.2847981, 0.3943414, 0.4685772],
        [0, 0.1331749, 0.2563006, 0.3569026, 0.4292439],
        [0, 0.118444, 0.2281518, 0.3199271, 0.3895228],
        [0, 0.1038327, 0.2005325, 0.2834821, 0.3494651],
        [0, 0.08952472, 0.1736295, 0.2476549, 0.3091381],
        [0, 0.07571325, 0.1476229, 0.2125565, 0.2686405],
        [0, 0.06256143, 0.1226884, 0.1783268, 0.2281181],
        [0, 0.05018431, 0.09897018, 0.1451366, 0.1877834],
        [0, 0.03863228, 0.07656601, 0.1131675, 0.1479145],
        [0, 0.02789962, 0.05551722, 0.08258236, 0.1088537],
        [0, 0.01793963, 0.03579896, 0.05349859, 0.07096451],
        [0, 0.008671138, 0.01733276, 0.02597587, 0.03458899],
        [0, 0, 0, 0, 0],
    ]
)
_MC_IQR = np.array(
    [
        [2.324208, 2.621975, 3.52784, 4.789851, 6.222852],
        [2.2433, 2.486388, 3.225692, 4.245049, 5.385608],
        [2.180128, 2.382507, 2.994907, 3.832951, 4.761422],
        [2.130401, 2.301473, 2.81422, 3.512495, 4.281628],
        [2.091069, 2.237293, 2.669868, 3.257615, 3.903464],
        [2.059892, 2.185774, 2.552603, 3.051086, 3.59914],
        [2.035167, 2.143917, 2.456015, 2.881128, 3.349932],
        [2.015559, 2.10954, 2.375538, 2.739448, 3.142837],
        [2, 2.081036, 2.307843, 2.620058, 2.96858],
        [1.987619, 2.057204, 2.250445, 2.518538, 2.820395],
        [1.977705, 2.037127, 2.201459, 2.431559, 2.693246],
        [1.969678, 2.020098, 2.159427, 2.356574, 2.583319],
        [1.963074, 2.005556, 2.123201, 2.291603, 2.487683],
        [1.957529, 1.993052, 2.091866, 2.235082, 2.404055],
        [1.952758, 1.982222, 2.064681, 2.185765, 2.330636],
        [1.948547, 1.972767, 2.041037, 2.142644, 2.265994],
        [1.944735, 1.964446, 2.020433, 2.104896, 2.208984],
        [1.941203, 1.95706, 2.002446, 2.071844, 2.158677],
        [1.937866, 1.950446, 1.986724, 2.042924, 2.114325],
        [1.934662, 1.944474, 1.97297, 2.017668, 2.075315],
        [1.931547, 1.939037, 1.960933, 1.995681, 2.041151],
        [1.928492, 1.934053, 1.950404, 1.976632, 2.01143],
        [1.925476, 1.929453, 1.941207, 1.960244, 1.985825],
        [1.922485, 1.925185, 1.933199, 1.946287, 1.964078],
        [1.919513, 1.921209, 1.926262, 1.934574, 1.945985],
        [1.916554, 1.917494, 1.920306, 1.924955, 1.931392],
        [1.913606, 1.91402, 1.915261, 1.917321, 1.920191],
        [1.91067, 1.910773, 1.911082, 1.911597, 1.912317],
        [1.907745, 1.907745, 1.907745, 1.907745, 1.907745],
    ]
)
_MC_MED = np.array(
    [
        [0, 0.07762717, 0.2719806, 0.5809966, 0.9966381],
        [0, 0.08387917, 0.2672619, 0.5488089, 0.9197134],
        [0, 0.08887304, 0.2620603, 0.5197433, 0.8532689],
        [0, 0.09271586, 0.2564523, 0.4931473, 0.7948477],
        [0, 0.09550874, 0.2504874, 0.4685339, 0.742705],
        [0, 0.09734531, 0.2441966, 0.4455298, 0.6955654],
        [0, 0.09831121, 0.2375965, 0.4238383, 0.6524696],
        [0, 0.09848961, 0.2306938, 0.4032198, 0.612684],
        [0, 0.09795658, 0.2234919, 0.3834783, 0.5756305],
        [0, 0.09678531, 0.2159878, 0.3644446, 0.5408482],
        [0, 0.09503454, 0.2081786, 0.3459808, 0.5079613],
        [0, 0.09276701, 0.2000579, 0.3279604, 0.4766569],
        [0, 0.09003073, 0.1916204, 0.3102712, 0.4466714],
        [0, 0.0868698, 0.1828577, 0.2928163, 0.4177769],
        [0, 0.08332103, 0.1737645, 0.2755024, 0.3897752],
        [0, 0.07941562, 0.1643279, 0.2582429, 0.3624836],
        [0, 0.07517932, 0.1545403, 0.2409604, 0.3357421],
        [0, 0.07062912, 0.1443872, 0.2235707, 0.3093935],
        [0, 0.06578002, 0.1338527, 0.2060011, 0.2832894],
        [0, 0.06064042, 0.1229168, 0.1881704, 0.2572857],
        [0, 0.05521233, 0.1115563, 0.1699974, 0.2312362],
        [0, 0.04949534, 0.09973917, 0.1513965, 0.2049869],
        [0, 0.04348132, 0.08743075, 0.1322785, 0.1783806],
        [0, 0.03715829, 0.07458708, 0.1125406, 0.1512442],
        [0, 0.03050651, 0.0611536, 0.09207223, 0.123387],
        [0, 0.02350343, 0.04706578, 0.07074471, 0.09459702],
        [0, 0.01611356, 0.03224521, 0.04841197, 0.06463249],
        [0, 0.008296964, 0.01659637, 0.02489895, 0.03320872],
        [0, 0, 0, 0, 0],
    ]
)


def _build_mcculloch_table(
    alphas: np.ndarray | None = None, betas: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Regenerate the McCulloch forward tables (not run at import; about 8 s).

    For each ``(alpha, beta)`` on the grid, the 5/25/50/75/95 % quantiles ``q`` of the
    standard stable law ``S0(alpha, beta, 1, 0)`` from ``scipy.stats.levy_stable.ppf``
    (parameterisation temporarily set to ``"S0"`` and restored) give
    ``nu_a = (q95 - q05)/(q75 - q25)``, ``nu_b = (q95 + q05 - 2 q50)/(q95 - q05)``,
    ``iqr = q75 - q25`` and ``med = q50`` (McCulloch, *Commun. Statist. Simul.* 15,
    1986, tables of ``phi_1 .. phi_5``, recomputed). Returns the four ``(A, B)``
    arrays plus ``alphas`` and ``betas``.
    """
    from scipy.stats import levy_stable

    al = _MC_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64)
    be = _MC_BETAS if betas is None else np.asarray(betas, dtype=np.float64)
    probs = [0.05, 0.25, 0.5, 0.75, 0.95]
    out = {name: np.empty((al.size, be.size)) for name in ("nu_a", "nu_b", "iqr", "med")}
    old = levy_stable.parameterization
    levy_stable.parameterization = "S0"
    try:
        for i, a in enumerate(al):  # loop over the grid: ppf is scalar-parameter
            for j, b in enumerate(be):
                q = np.asarray(levy_stable.ppf(probs, a, b), dtype=np.float64)
                out["nu_a"][i, j] = (q[4] - q[0]) / (q[3] - q[1])
                out["nu_b"][i, j] = (q[4] + q[0] - 2.0 * q[2]) / (q[4] - q[0])
                out["iqr"][i, j] = q[3] - q[1]
                out["med"][i, j] = q[2]
    finally:
        levy_stable.parameterization = old
    out["alphas"] = al.copy()
    out["betas"] = be.copy()
    return out


@functools.lru_cache(maxsize=1)
def _mcculloch_splines() -> tuple[Any, Any, Any, Any]:
    from scipy.interpolate import RectBivariateSpline

    def spl(z: np.ndarray) -> Any:
        return RectBivariateSpline(_MC_ALPHAS, _MC_BETAS, z, kx=3, ky=3, s=0)

    return spl(np.log(_MC_NU_A)), spl(_MC_NU_B), spl(_MC_IQR), spl(_MC_MED)


def _solve_monotone(f: Any, target: float, lo: float, hi: float) -> float:
    """Root of ``f(t) = target`` on ``[lo, hi]`` by bisection (``f`` monotone), or the
    end point nearest to the target if none is bracketed."""
    f_lo, f_hi = f(lo) - target, f(hi) - target
    if f_lo == 0:
        return lo
    if f_hi == 0 or f_lo * f_hi > 0:
        return lo if abs(f_lo) < abs(f_hi) else hi
    for _ in range(60):  # bisection to ~1e-18 relative width
        mid = 0.5 * (lo + hi)
        f_mid = f(mid) - target
        if f_mid == 0:
            return mid
        if (f_mid > 0) == (f_lo > 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mcculloch(x: Any, *, input_description: str = "unspecified") -> McCullochResult:
    """McCulloch (1986) quantile estimator of a stable law ``S(alpha, beta, gamma, delta)``.

    From the sample quantiles ``q_p`` (Hazen plotting positions ``(i - 1/2)/n``, as
    McCulloch uses):

        ``nu_alpha = (q95 - q05) / (q75 - q25)``,  ``nu_beta = (q95 + q05 - 2 q50) / (q95 - q05)``.

    Both are location- and scale-free; ``(alpha, beta)`` solve
    ``phi_1(alpha, |beta|) = nu_alpha``, ``sign(beta) phi_2(alpha, |beta|) = nu_beta``
    with ``phi_1``, ``phi_2`` interpolated (bicubic; ``ln phi_1``) from a forward table
    on ``alpha in [0.6, 2]`` step 0.05, ``beta in {0, .25, .5, .75, 1}`` computed with
    ``scipy.stats.levy_stable`` (see :func:`_build_mcculloch_table`); solved by
    alternating monotone 1-D inversions. Then ``gamma = (q75 - q25) / phi_3(alpha,
    beta)`` and ``delta = q50 - gamma * phi_5(alpha, beta)`` (``phi_5`` the median of
    the standard law, Nolan's ``S0`` parameterisation). J. H. McCulloch, "Simple
    consistent estimators of stable distribution parameters", *Commun. Statist.
    Simul. Comput.* 15 (1986).

    ``alpha`` is clipped to ``[0.6, 2]`` (``nu_alpha`` below the Gaussian value 2.4387
    gives 2) and ``beta`` to ``[-1, 1]``, with flags. At ``alpha = 2`` ``beta`` is
    undetermined and reported as 0. Symmetric data (``beta = 0``) is the well-tested
    case; the estimator's standard deviation is about ``1/sqrt(n)`` times a few.

    Parameters:
        x
            Any array (flattened); non-finite values are dropped and counted in ``flags``.
        input_description
            What ``x`` is, copied to the result.

    Returns:
        :class:`McCullochResult` (``alpha``, ``beta``, ``scale``, ``location``, ``nu_alpha``,
        ``nu_beta``, ``n``, ``flags``).

    Raises:
        PhasewatchError
            Fewer than 20 finite values, or ``q75 == q25`` (degenerate sample).

    Examples:
        Cauchy: ``alpha = 1``, ``beta = 0``, scale 1, location 0 (sampling standard deviations
        about 0.01 at ``n = 10^5``: the tolerance is 5 of them).

        >>> import numpy as np
        >>> r = mcculloch(np.random.default_rng(0).standard_cauchy(100_000))
        >>> [bool(abs(v - t) < 0.05) for v, t in ((r.alpha, 1), (r.beta, 0), (r.scale, 1), (r.location, 0))]
        [True, True, True, True]
    """
    v = np.asarray(x, dtype=np.float64).ravel()
    ok = np.isfinite(v)
    n_drop = int(v.size - np.count_nonzero(ok))
    v = v[ok]
    flags: list[str] = list(_dropped_flag(n_drop))
    n = int(v.size)
    if n < _MIN_MCCULLOCH_VALUES:
        raise PhasewatchError(f"mcculloch needs at least {_MIN_MCCULLOCH_VALUES} finite values, got {n}")
    q05, q25, q50, q75, q95 = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95], method="hazen")
    iqr = float(q75 - q25)
    if not iqr > 0:
        raise PhasewatchError("mcculloch: degenerate sample (q75 == q25)")
    nu_a = float((q95 - q05) / iqr)
    nu_b = float((q95 + q05 - 2.0 * q50) / (q95 - q05))
    s_lnnu, s_nub, s_iqr, s_med = _mcculloch_splines()
    a_lo, a_hi = float(_MC_ALPHAS[0]), float(_MC_ALPHAS[-1])
    sign = 1.0 if nu_b >= 0 else -1.0
    target_b = abs(nu_b)
    ln_nu = math.log(nu_a)
    alpha, beta = a_hi, 0.0
    for _ in range(100):  # alternate the two monotone 1-D inversions until a fixed point
        alpha_new = _solve_monotone(lambda t, b=beta: float(s_lnnu(t, b)[0, 0]), ln_nu, a_lo, a_hi)
        if float(s_nub(alpha_new, 1.0)[0, 0]) < 1e-9:
            beta_new = 0.0
        else:
            beta_new = _solve_monotone(lambda b, a=alpha_new: float(s_nub(a, b)[0, 0]), target_b, 0.0, 1.0)
        done = abs(alpha_new - alpha) < 1e-10 and abs(beta_new - beta) < 1e-10
        alpha, beta = alpha_new, beta_new
        if done:
            break
    if ln_nu >= float(s_lnnu(a_lo, beta)[0, 0]):
        flags.append(f"alpha clipped to {a_lo}: nu_alpha = {nu_a:.4g} beyond the table")
    if alpha >= a_hi - 1e-12:
        alpha = a_hi
        beta = 0.0
        if nu_a < float(_MC_NU_A[-1, 0]) - 1e-12:
            flags.append(f"alpha clipped to 2: nu_alpha = {nu_a:.4g} below the Gaussian value 2.4387")
    elif beta >= 1.0 and target_b > float(s_nub(alpha, 1.0)[0, 0]):
        flags.append(f"beta clipped to {sign:+.0f}: |nu_beta| = {target_b:.4g} beyond the table")
    beta *= sign
    scale = iqr / float(s_iqr(alpha, abs(beta))[0, 0])
    location = float(q50) - scale * sign * float(s_med(alpha, abs(beta))[0, 0])
    return McCullochResult(
        alpha=float(alpha),
        beta=float(beta),
        scale=float(scale),
        location=float(location),
        nu_alpha=nu_a,
        nu_beta=nu_b,
        n=n,
        parameterization="S0",
        flags=tuple(flags),
        input_description=str(input_description),
    )
