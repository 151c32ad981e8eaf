"""Lead-time statistics: planted precursors of known lead, exact null p-values, and the nominal
rejection rate on pure noise."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
from scipy import stats

from phasewatch.analysis.events import OnsetRule
from phasewatch.analysis.leadtime import (
    classify,
    lead_time,
    median_ci,
    onset_matrix,
    permutation_test,
    proportion_ci,
    shift_test,
    summarize,
)


def _precursor(N: int, event: int, lead: int) -> tuple[np.ndarray, np.ndarray]:
    """A g23-like series: a peak, then its first fall below peak/1.5 exactly ``lead`` steps before
    ``event`` (steps 1..N)."""
    steps = np.arange(1, N + 1)
    onset = event - lead
    v = np.full(N, 0.9)
    v[(steps >= onset - 10) & (steps < onset)] = 1.0  # the pre-event peak
    v[steps >= onset] = 0.6  # below 1/1.5 = 0.667 from the onset on
    return steps, v


@pytest.mark.parametrize("lead", [1, 7, 30, 55])
def test_planted_lead_recovered_exactly(lead):
    steps, v = _precursor(300, 200, lead)
    rule = OnsetRule("decline", {"factor": 1.5})
    t = shift_test(steps, v, rule, 200)
    assert t.tau == lead
    assert lead_time(200, rule(steps, v, 200).step) == lead
    assert classify(t.tau) == "lead" and t.exhaustive and t.n_shifts == 299


def test_lag_is_reported_as_a_lag():
    steps, v = _precursor(300, 150, 20)  # onset at 130
    rule = OnsetRule("decline", {"factor": 1.5})
    t = shift_test(steps, v, rule, 110, alternative="lead")  # event before the decline
    assert t.tau == -20 and classify(t.tau) == "lag" and t.p == 1.0
    t2 = shift_test(steps, v, rule, 110, alternative="lag")
    assert t2.tau == -20 and t2.p < 1.0


@pytest.mark.parametrize("lead,event", [(0, 150), (5, 150), (40, 190), (3, 10)])
def test_shift_p_value_equals_the_exact_count(lead, event):
    """A single spike at index i0, threshold onset: rotated by k the onset is at (i0+k) mod N, so
    exactly τ of the N−1 rotations put it in [t_event−τ, t_event]: p = (1+τ)/N."""
    N = 200
    steps = np.arange(1, N + 1)
    v = np.zeros(N)
    v[event - lead - 1] = 1.0  # step event − lead
    t = shift_test(steps, v, OnsetRule(">0.5"), event)
    assert t.tau == lead
    assert t.p == pytest.approx((1 + lead) / N)
    # |τ| ≤ τ: positions on both sides (those that exist)
    te = shift_test(steps, v, OnsetRule(">0.5"), event, alternative="either")
    n_pos = sum(1 for s in steps if abs(event - s) <= lead)
    assert te.p == pytest.approx(n_pos / N)
    # Monte Carlo shifts: (1 + #extreme)/(1 + n), with n distinct rotations
    tm = shift_test(steps, v, OnsetRule(">0.5"), event, n_shifts=50, seed=3)
    assert not tm.exhaustive and tm.n_shifts == 50 and len(set(tm.shifts)) == 50
    pos = (event - lead - 1 + tm.shifts) % N + 1  # onset steps under the shifts
    k = np.count_nonzero((event - pos >= 0) & (event - pos <= lead))
    assert tm.p == pytest.approx((1 + k) / 51)


def _binomial_band(n: int, a: float, tail: float = 1e-4) -> tuple[int, int]:
    return int(stats.binom.ppf(tail, n, a)), int(stats.binom.isf(tail, n, a))


@pytest.mark.parametrize("name,params,transform", [
    ("peak", {}, None), ("decline", {"factor": 1.5}, np.exp), (">1.8", {}, None), ("cross", {"level": 1.0}, None),
])
def test_pure_noise_rejects_at_the_nominal_rate(name, params, transform):
    """i.i.d. noise has no lead: over many seeds a 5 % test rejects ~5 % of the time, and P(p ≤ a)
    tracks a (within a binomial band at 1e-4 per side; conservative rules may fall below)."""
    n_seeds, N = 200, 60
    rule = OnsetRule(name, params)
    ps = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(1000 + seed)
        v = rng.standard_normal(N)
        if transform is not None:
            v = transform(v)
        event = int(rng.integers(25, 58))
        ps.append(shift_test(np.arange(1, N + 1), v, rule, event).p)
    ps = np.array(ps)
    for a in (0.05, 0.2, 0.5):
        k = int(np.count_nonzero(ps <= a))
        lo, hi = _binomial_band(n_seeds, a)
        assert k <= hi, (a, k, hi)  # never anti-conservative
        if name in ("peak", "decline"):  # continuous onsets: no ties, p uniform
            assert k >= lo, (a, k, lo)
    assert np.count_nonzero(ps <= 0.05) >= 0.02 * n_seeds  # not trivially conservative


def test_permutation_test_matches_the_count_of_permutations():
    """Six runs, events 100, 130, …, 250, each onset exactly 10 before its own event: only the
    identity and the 15 single transpositions keep ≥ 4 of 6 distances at 10 (a median of 10), so
    p = 16/720; brute force over all 720 pairings agrees."""
    events = [100, 130, 160, 190, 220, 250]
    sigs = [_precursor(320, e, 10) for e in events]
    rule = OnsetRule("decline", {"factor": 1.5})
    O = onset_matrix(sigs, rule, events)  # noqa: E741
    assert np.all(np.diag(O) == np.array(events) - 10)
    t = permutation_test(O, events)
    assert t.statistic == 10 and t.exhaustive and t.n_perm == 720
    assert t.p == pytest.approx(16 / 720)
    brute = 0
    for perm in permutations(range(6)):
        d = []
        for i, j in enumerate(perm):
            tau = events[j] - O[i, j]
            d.append(tau if (not math.isnan(tau) and tau >= 0) else math.inf)
        brute += float(np.median(d)) <= 10
    assert t.p == pytest.approx(brute / 720)
    # random pairings above the exhaustive limit: (1 + #)/(1 + n)
    tr = permutation_test(O, events, max_exhaustive_runs=3, n_perm=2000, seed=1)
    assert not tr.exhaustive and abs(tr.p - 16 / 720) < 0.015


def test_permutation_test_on_noise_is_not_anticonservative():
    n_seeds, M, N = 150, 5, 80
    rule = OnsetRule("peak")
    ps = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        events = rng.integers(20, 75, M)
        sigs = [(np.arange(1, N + 1), rng.standard_normal(N)) for _ in range(M)]
        ps.append(permutation_test(onset_matrix(sigs, rule, events), events).p)
    ps = np.array(ps)
    for a in (0.05, 0.2, 0.5):
        assert np.count_nonzero(ps <= a) <= _binomial_band(n_seeds, a)[1]


def test_proportion_ci_is_clopper_pearson():
    assert proportion_ci(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert proportion_ci(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    for k, n in [(3, 7), (1, 3), (12, 40)]:
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert proportion_ci(k, n) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert all(math.isnan(x) for x in proportion_ci(0, 0))


def test_median_ci_coverage_and_edge_cases():
    m = median_ci([5.0])
    assert (m.median, m.lo, m.hi, m.n) == (5.0, 5.0, 5.0, 1)
    assert math.isnan(median_ci([]).median)
    assert median_ci([1, 2, 3, np.nan, 100]).median == 2.5
    covered = 0
    reps = 200
    for seed in range(reps):
        x = np.random.default_rng(seed).standard_normal(31)
        r = median_ci(x, n_boot=400, seed=seed)
        covered += r.lo <= 0.0 <= r.hi
    lo, hi = _binomial_band(reps, 0.95, 1e-3)
    assert lo - 6 <= covered <= hi  # percentile bootstrap of a median: close to nominal


def test_summarize_counts_every_case():
    s = summarize([12, 0, -5, None, 30], [True, False, False, False])
    assert (s.n_event_runs, s.hits, s.coincident, s.lags, s.n_onset) == (5, 2, 1, 1, 4)
    assert s.hit_rate == pytest.approx(0.4) and s.false_alarm_rate == pytest.approx(0.25)
    assert s.median_tau.median == 6.0  # median of 12, 0, −5, 30: lags enter with their sign
    assert s.hit_ci == proportion_ci(2, 5)
    d = s.to_dict()
    assert d["false_alarms"] == 1 and d["median_tau"] == 6.0
    assert math.isnan(summarize([], []).hit_rate)
