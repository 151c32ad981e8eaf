"""Lead-time statistics: does a signal move before the transition, and would it fire without one?

DEFINITIONS §6 ("Precursor statistics").  For a run with an event at step t_event and a signal whose
onset rule fires at t_onset (:class:`~phasewatch.analysis.events.OnsetRule`), the lead time is

    τ = t_event − t_onset      (steps; τ > 0: the signal moved first, τ < 0: a lag)

and is reported whichever its sign.  Significance is judged against two nulls:

* **circular shifts** (:func:`shift_test`): the signal's values are rotated by k positions against
  fixed steps (k = 1..N−1, all of them or a random subset), the onset recomputed, and
  p = #{shifts at least as extreme, the observed one included} / #{shifts + 1}.  Under the null of a
  signal whose distribution is invariant under rotation (e.g. stationary, as i.i.d. noise) and
  independent of the event the observed rotation is one of N exchangeable ones, so the p-value is
  valid (P(p ≤ a) ≤ a; ties make it conservative).  Rotation joins the end of the series to its
  start; a strongly trending signal is not rotation invariant, and the test then answers "is the
  onset placed specially relative to the event, compared with the same values in other places".
  (Randomization tests with a group of transformations: Hemerik & Goeman 2018, JRSS-B 80:137.)
* **permutation across runs** (:func:`permutation_test`): each run's signal is paired with another
  run's event step; the statistic is the median over runs of the one-sided distance (τ for
  ``lead``), and p is the fraction of pairings (all M! for M ≤ 8 runs, else random ones) whose
  statistic is at least as small as the true pairing's.  With similar event steps in every run this
  test has little power, and with M runs its smallest p is 1/M!.

"Extreme" depends on ``alternative``: ``lead``: 0 ≤ τ* ≤ τ (an onset at least as close before the
event), ``lag``: τ ≤ τ* ≤ 0, ``either``: |τ*| ≤ |τ|.  A shift without an onset is never extreme; an
observed τ of the wrong sign (or no onset) gives p = 1.

Summaries (:func:`summarize`): hit rate (event runs with τ ≥ ``min_lead``), false-alarm rate (control
runs, i.e. without the event, on which the rule fired), both with Clopper–Pearson intervals, and the
median τ over event runs with an onset (lags included, signed) with a percentile-bootstrap interval.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..errors import PhasewatchError
from .result import Estimate

__all__ = [
    "lead_time",
    "classify",
    "ShiftTest",
    "shift_test",
    "PermutationTest",
    "permutation_test",
    "onset_matrix",
    "proportion_ci",
    "MedianCI",
    "median_ci",
    "LeadTimeSummary",
    "summarize",
]

ALTERNATIVES = ("lead", "lag", "either")


def lead_time(event_step: float | None, onset_step: float | None) -> float | None:
    """τ = t_event − t_onset (None if either is missing)."""
    if event_step is None or onset_step is None:
        return None
    return float(event_step) - float(onset_step)


def classify(tau: float | None, min_lead: float = 1) -> str:
    """``lead`` (τ ≥ min_lead), ``coincident`` (0 ≤ τ < min_lead), ``lag`` (τ < 0) or ``no onset``."""
    if tau is None or (isinstance(tau, float) and math.isnan(tau)):
        return "no onset"
    if tau >= min_lead:
        return "lead"
    return "coincident" if tau >= 0 else "lag"


def _check_alt(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise PhasewatchError(f"alternative={alternative!r}: use lead, lag or either")
    return alternative


def _extreme(null: np.ndarray, obs: float, alternative: str) -> np.ndarray:
    """Which null τ are at least as extreme as the observed τ (NaN never)."""
    t = np.asarray(null, dtype=float)
    with np.errstate(invalid="ignore"):
        if alternative == "lead":
            return (t >= 0) & (t <= obs)
        if alternative == "lag":
            return (t <= 0) & (t >= obs)
        return np.abs(t) <= abs(obs)


def _eligible(tau: float | None, alternative: str) -> bool:
    if tau is None or math.isnan(tau):
        return False
    return not ((alternative == "lead" and tau < 0) or (alternative == "lag" and tau > 0))


def _onset_step(rule: Callable, steps: np.ndarray, values: np.ndarray, ref: float | None) -> float:
    """Onset step (NaN if none) from an OnsetRule (fast path) or any callable returning a step/Onset."""
    if hasattr(rule, "index"):
        i = rule.index(steps, values, ref)
        return math.nan if i is None else float(steps[i])
    r = rule(steps, values, ref)
    if r is None:
        return math.nan
    return float(getattr(r, "step", r))


@dataclass(frozen=True, eq=False)
class ShiftTest:
    """Circular-shift test of one run.

    tau: observed τ (None: no onset); p: the p-value for ``alternative``; shifts: the rotations used
    (positions); null_tau: τ under each of them (NaN: no onset); exhaustive: all N−1 rotations used."""

    tau: float | None
    p: float
    alternative: str
    n_shifts: int
    exhaustive: bool
    shifts: np.ndarray
    null_tau: np.ndarray


def shift_test(
    steps: np.ndarray,
    values: np.ndarray,
    rule: Callable,
    event_step: float,
    *,
    alternative: str = "lead",
    n_shifts: int | None = None,
    seed: int | np.random.Generator | None = 0,
    max_exhaustive: int = 2000,
) -> ShiftTest:
    """Circular-shift null for the lead time of one run (see the module docstring).

    ``rule(steps, values, ref_step)`` gives the onset (an :class:`OnsetRule`, or any callable
    returning a step, an object with ``.step``, or None); ``ref_step`` is the event step.  All N−1
    rotations are used when ``n_shifts`` is None and N−1 ≤ ``max_exhaustive``, or when
    ``n_shifts`` ≥ N−1; otherwise ``n_shifts`` distinct random rotations (Monte Carlo p-value
    (1 + #extreme)/(1 + n)).
    """
    alternative = _check_alt(alternative)
    s = np.asarray(steps)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1:
        raise PhasewatchError(f"shift_test: steps and values must be 1-D of one length, got {s.shape}, {v.shape}")
    N = v.size
    obs = _onset_step(rule, s, v, event_step)
    tau = None if math.isnan(obs) else float(event_step) - obs
    if N < 2:
        return ShiftTest(tau, 1.0, alternative, 0, True, np.zeros(0, int), np.zeros(0))
    if (n_shifts is None and N - 1 <= max_exhaustive) or (n_shifts is not None and n_shifts >= N - 1):
        shifts = np.arange(1, N)
        exhaustive = True
    else:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        n = int(n_shifts if n_shifts is not None else 999)
        shifts = np.sort(rng.choice(np.arange(1, N), size=n, replace=False))
        exhaustive = False
    null_tau = np.empty(shifts.size)
    if hasattr(rule, "index_at"):  # OnsetRule: the reference index is the same for every rotation
        ri = rule.ref_index(s, event_step)
        sf = s.astype(float)
        for j, k in enumerate(shifts):
            i = rule.index_at(np.roll(v, int(k)), ri)
            null_tau[j] = float(event_step) - (math.nan if i is None else sf[i])
    else:
        for j, k in enumerate(shifts):
            null_tau[j] = float(event_step) - _onset_step(rule, s, np.roll(v, int(k)), event_step)
    if not _eligible(tau, alternative):
        p = 1.0
    else:
        p = (1.0 + np.count_nonzero(_extreme(null_tau, tau, alternative))) / (1.0 + shifts.size)
    return ShiftTest(tau, float(p), alternative, int(shifts.size), exhaustive, shifts, null_tau)


def onset_matrix(
    signals: Sequence[tuple[np.ndarray, np.ndarray]], rule: Callable, event_steps: Sequence[float]
) -> np.ndarray:
    """``O[i, j]``: onset step of run i's signal with the reference (event) step of run j (NaN: none).

    Rules that do not use the reference give the same onset in every column."""
    M = len(signals)
    ev = [float(e) for e in event_steps]
    if len(ev) != M:
        raise PhasewatchError(f"onset_matrix: {M} signals but {len(ev)} event steps")
    O = np.full((M, M), np.nan)  # noqa: E741
    uses_ref = getattr(rule, "uses_reference", True)
    for i, (s, v) in enumerate(signals):
        s, v = np.asarray(s), np.asarray(v, dtype=float)
        if not uses_ref:
            O[i, :] = _onset_step(rule, s, v, None)
            continue
        for j in range(M):
            O[i, j] = _onset_step(rule, s, v, ev[j])
    return O


def _distance(tau: np.ndarray, alternative: str) -> np.ndarray:
    t = np.asarray(tau, dtype=float)
    with np.errstate(invalid="ignore"):
        if alternative == "lead":
            d = np.where(t >= 0, t, np.inf)
        elif alternative == "lag":
            d = np.where(t <= 0, -t, np.inf)
        else:
            d = np.abs(t)
    return np.where(np.isnan(d), np.inf, d)


@dataclass(frozen=True, eq=False)
class PermutationTest:
    """Permutation-across-runs test.

    statistic: median over runs of the one-sided distance (τ for ``lead``, −τ for ``lag``, |τ| for
    ``either``; inf where the onset is missing or on the wrong side) for the true pairing; p: the
    fraction of pairings at least as small (identity included); n_perm: pairings used."""

    statistic: float
    p: float
    alternative: str
    n_perm: int
    exhaustive: bool
    null_statistic: np.ndarray


def permutation_test(
    onsets: np.ndarray,
    event_steps: Sequence[float],
    *,
    alternative: str = "lead",
    n_perm: int = 9999,
    seed: int | np.random.Generator | None = 0,
    max_exhaustive_runs: int = 8,
) -> PermutationTest:
    """Pair every run's signal with other runs' events (see the module docstring).

    ``onsets`` is the matrix of :func:`onset_matrix` (M×M).  With M ≤ ``max_exhaustive_runs`` every
    one of the M! pairings is used and p = #{π: T(π) ≤ T(id)} / M!; otherwise ``n_perm`` random
    pairings and p = (1 + #)/(1 + n_perm).  Needs M ≥ 2 runs with the event (else p is NaN).
    """
    alternative = _check_alt(alternative)
    O = np.asarray(onsets, dtype=float)  # noqa: E741
    ev = np.asarray(event_steps, dtype=float)
    M = ev.size
    if O.shape != (M, M):
        raise PhasewatchError(f"permutation_test: onsets must be {M}x{M}, got {O.shape}")
    tau = ev[None, :] - O  # tau[i, j]: signal i against event j
    D = _distance(tau, alternative)
    obs = float(np.median(np.diag(D))) if M else math.inf
    if M < 2:
        return PermutationTest(obs, math.nan, alternative, 0, True, np.zeros(0))
    rows = np.arange(M)
    if M <= max_exhaustive_runs:
        perms = np.array(list(itertools.permutations(range(M))))
        null = np.median(D[rows[None, :], perms], axis=1)
        p = np.count_nonzero(null <= obs) / len(perms) if math.isfinite(obs) else 1.0
        return PermutationTest(obs, float(p), alternative, len(perms), True, null)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    perms = np.array([rng.permutation(M) for _ in range(int(n_perm))])
    null = np.median(D[rows[None, :], perms], axis=1)
    p = (1.0 + np.count_nonzero(null <= obs)) / (1.0 + len(perms)) if math.isfinite(obs) else 1.0
    return PermutationTest(obs, float(p), alternative, len(perms), False, null)


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson (exact binomial) interval of k successes in n trials; (nan, nan) for n = 0.

    lo = Beta⁻¹((1−level)/2; k, n−k+1), hi = Beta⁻¹((1+level)/2; k+1, n−k) (Clopper & Pearson 1934)."""
    if n <= 0:
        return (math.nan, math.nan)
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return (lo, hi)


@dataclass(frozen=True)
class MedianCI(Estimate):
    """Median with a percentile-bootstrap interval (resampling the values with replacement)."""

    _statistic_field = "median"  # statistic / confidence_interval: Estimate
    _interval_field = ("lo", "hi")

    median: float
    lo: float
    hi: float
    n: int
    n_boot: int
    level: float
    method: str = "percentile bootstrap over runs"


def median_ci(x: Sequence[float], level: float = 0.95, n_boot: int = 2000,
              seed: int | np.random.Generator | None = 0) -> MedianCI:
    """Median of the finite values of ``x`` and its percentile-bootstrap interval (Efron & Tibshirani
    1993, ch. 13): the (1−level)/2 and (1+level)/2 quantiles of the medians of ``n_boot`` resamples.
    One value gives a zero-width interval; none gives NaN."""
    a = np.asarray(x, dtype=float)
    a = a[np.isfinite(a)]
    if not a.size:
        return MedianCI(math.nan, math.nan, math.nan, 0, 0, level)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    reps = np.median(a[rng.integers(0, a.size, size=(int(n_boot), a.size))], axis=1)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return MedianCI(float(np.median(a)), float(lo), float(hi), int(a.size), int(n_boot), level)


@dataclass(frozen=True)
class LeadTimeSummary:
    """What a precursor study says (see :func:`summarize`)."""

    n_event_runs: int
    n_control_runs: int
    n_onset: int
    hits: int
    hit_rate: float
    hit_ci: tuple[float, float]
    lags: int
    coincident: int
    false_alarms: int
    false_alarm_rate: float
    false_alarm_ci: tuple[float, float]
    median_tau: MedianCI
    min_lead: float
    level: float

    def to_dict(self) -> dict[str, Any]:
        def f(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

        m = self.median_tau
        return {
            "n_event_runs": self.n_event_runs, "n_control_runs": self.n_control_runs,
            "n_onset": self.n_onset, "hits": self.hits, "hit_rate": f(self.hit_rate),
            "hit_ci": [f(c) for c in self.hit_ci], "lags": self.lags, "coincident": self.coincident,
            "false_alarms": self.false_alarms, "false_alarm_rate": f(self.false_alarm_rate),
            "false_alarm_ci": [f(c) for c in self.false_alarm_ci],
            "median_tau": f(m.median), "median_tau_ci": [f(m.lo), f(m.hi)], "median_tau_n": m.n,
            "median_tau_method": m.method, "min_lead": self.min_lead, "level": self.level,
        }


def summarize(
    event_taus: Sequence[float | None],
    control_fired: Sequence[bool],
    *,
    min_lead: float = 1,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int | np.random.Generator | None = 0,
) -> LeadTimeSummary:
    """Hit rate, false-alarm rate and median τ.

    event_taus: τ of each run with the event (None: the rule never fired); control_fired: for each
    run without the event, whether the rule fired.  Hit: τ ≥ ``min_lead`` (default 1 step: an onset at
    the event step itself is "coincident", not a warning).  The median τ is over event runs with an
    onset, lags included with their sign."""
    taus = [None if t is None or (isinstance(t, float) and math.isnan(t)) else float(t) for t in event_taus]
    status = [classify(t, min_lead) for t in taus]
    n_ev, n_ct = len(taus), len(control_fired)
    hits = status.count("lead")
    fa = int(sum(bool(x) for x in control_fired))
    return LeadTimeSummary(
        n_event_runs=n_ev, n_control_runs=n_ct, n_onset=sum(t is not None for t in taus), hits=hits,
        hit_rate=hits / n_ev if n_ev else math.nan, hit_ci=proportion_ci(hits, n_ev, level),
        lags=status.count("lag"), coincident=status.count("coincident"), false_alarms=fa,
        false_alarm_rate=fa / n_ct if n_ct else math.nan, false_alarm_ci=proportion_ci(fa, n_ct, level),
        median_tau=median_ci([t for t in taus if t is not None], level, n_boot, seed),
        min_lead=float(min_lead), level=float(level),
    )
