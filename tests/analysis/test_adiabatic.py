"""Tests for phasewatch.analysis.adiabatic."""

from __future__ import annotations

import numpy as np
import pytest

from phasewatch.analysis.adiabatic import (
    REGIME_FORGETTING,
    REGIME_PLATEAU,
    REGIME_TRANSITION,
    REGIME_UNDEFINED,
    AdiabaticResult,
    adiabatic,
    classify_regime,
    delta_fro_canonical,
    delta_fro_eigen,
)
from phasewatch.analysis.gram import (
    band_from_updates,
    compute_spectra,
    stability_coefficients,
)


def window_operator(U: np.ndarray, r: int, W: int) -> np.ndarray:
    C = np.zeros((U.shape[1], U.shape[1]))
    for i in range(r - W + 1, r + 1):
        C += np.outer(U[i], U[i])
    return C


@pytest.mark.parametrize("W", [2, 4])
def test_canonical_delta_equals_explicit_outer_products(W: int) -> None:
    rng = np.random.default_rng(10)
    T, P = 25, 30
    U = rng.standard_normal((T, P)) * rng.uniform(0.1, 3.0, (T, 1))
    U[7] = 0.9 * U[7 - W] + 0.1 * U[7]  # strongly correlated pair u_7, u_{7-W}
    band = band_from_updates(U, W + 2)
    spec = compute_spectra(band, W)
    d = delta_fro_canonical(band, spec.ends, W)
    assert np.isnan(d[0])
    for n, r in enumerate(spec.ends[1:], start=1):
        explicit = np.linalg.norm(window_operator(U, r, W) - window_operator(U, r - 1, W))
        assert d[n] == pytest.approx(explicit, rel=1e-9)


def test_canonical_per_layer_band() -> None:
    rng = np.random.default_rng(11)
    T, P, W = 12, 10, 3
    U = rng.standard_normal((T, P))
    per_layer = band_from_updates(U, W + 1, layer_sizes=[4, 6])
    ends = np.arange(W - 1, T)
    d = delta_fro_canonical(per_layer, ends, W)
    assert d.shape == (ends.size, 2)
    for n, r in enumerate(ends[1:], start=1):
        for layer, cols in enumerate([slice(0, 4), slice(4, 10)]):
            Ul = U[:, cols]
            explicit = np.linalg.norm(window_operator(Ul, r, W) - window_operator(Ul, r - 1, W))
            assert d[n, layer] == pytest.approx(explicit, rel=1e-9)


def test_canonical_needs_lag_w() -> None:
    rng = np.random.default_rng(12)
    U = rng.standard_normal((10, 8))
    band = band_from_updates(U, 3)
    spec = compute_spectra(band, 3)
    with pytest.warns(RuntimeWarning, match="K=3"):
        d = delta_fro_canonical(band, spec.ends, 3)
    assert np.isnan(d).all()
    # the eigen variant still works with K == W
    res = adiabatic(band, spec.eigs, spec.ends, spec.gap, np.full(10, 0.1), 3, "eigen")
    assert np.isfinite(res.A[1:]).all() and np.isnan(res.A[0])


def test_eigen_variant_is_lower_bound() -> None:
    rng = np.random.default_rng(13)
    for P in (3, 40):  # P < W and P > W
        U = rng.standard_normal((30, P)) * rng.uniform(0.2, 2.0, (30, 1))
        W = 5
        band = band_from_updates(U, W + 1)
        spec = compute_spectra(band, W)
        canon = delta_fro_canonical(band, spec.ends, W)
        eig = delta_fro_eigen(spec.eigs, spec.ends)
        ok = np.isfinite(canon) & np.isfinite(eig)
        assert ok.sum() == len(spec) - 1
        assert np.all(eig[ok] <= canon[ok] * (1 + 1e-9) + 1e-12)
        # and it is the eigenvalue change it claims to be
        np.testing.assert_allclose(
            eig[1:], np.linalg.norm(spec.eigs[1:] - spec.eigs[:-1], axis=1), rtol=1e-12
        )


def test_eigen_variant_non_consecutive_ends() -> None:
    eigs = np.array([[3.0, 1.0], [4.0, 1.0], [5.0, 2.0]])
    d = delta_fro_eigen(eigs, np.array([2, 3, 5]))
    assert np.isnan(d[0]) and d[1] == pytest.approx(1.0) and np.isnan(d[2])


def test_adiabatic_formula_and_regimes() -> None:
    rng = np.random.default_rng(14)
    T, P, W = 30, 50, 4
    U = rng.standard_normal((T, P))
    band = band_from_updates(U, W + 1)
    spec = compute_spectra(band, W)
    lr = rng.uniform(1e-3, 1e-1, T)
    lr[20] = np.nan
    res = adiabatic(band, spec.eigs, spec.ends, spec.gap, lr, W)
    assert isinstance(res, AdiabaticResult) and res.variant == "canonical"
    expected = res.delta_fro / (lr[spec.ends] * spec.gap**2)
    np.testing.assert_allclose(res.A, expected, rtol=1e-12)
    np.testing.assert_array_equal(res.regime, classify_regime(expected))
    assert np.isnan(res.A[spec.ends == 20]).all()
    assert res.regime[0] == REGIME_UNDEFINED and res.regime[spec.ends == 20] == REGIME_UNDEFINED
    labels = res.labels()
    assert labels[0] == "undefined" and set(labels) <= {
        "undefined",
        "plateau",
        "transition",
        "forgetting",
    }
    # per-layer band gives the same global result
    per_layer = band_from_updates(U, W + 1, layer_sizes=[20, 30])
    res2 = adiabatic(per_layer, spec.eigs, spec.ends, spec.gap, lr, W)
    np.testing.assert_allclose(res2.A, res.A, rtol=1e-10)
    with pytest.raises(ValueError):
        adiabatic(band, spec.eigs, spec.ends, spec.gap, lr[:-1], W)
    with pytest.raises(ValueError):
        adiabatic(band, spec.eigs, spec.ends, spec.gap, lr, W, "bogus")  # type: ignore[arg-type]


def test_classify_regime_thresholds() -> None:
    A = np.array([0.01, 0.1, 1.0, 10.0, 10.5, np.nan, np.inf])
    reg = classify_regime(A)
    assert reg.tolist() == [
        REGIME_PLATEAU,
        REGIME_TRANSITION,
        REGIME_TRANSITION,
        REGIME_TRANSITION,
        REGIME_FORGETTING,
        REGIME_UNDEFINED,
        REGIME_UNDEFINED,
    ]
    reg2 = classify_regime(A, plateau_below=2.0, forgetting_above=5.0)
    assert reg2[:5].tolist() == [0, 0, 0, 2, 2]
    with pytest.raises(ValueError):
        classify_regime(A, plateau_below=5.0, forgetting_above=1.0)


def test_zero_gap_gives_undefined() -> None:
    rng = np.random.default_rng(15)
    U = rng.standard_normal((8, 6))
    band = band_from_updates(U, 4)
    spec = compute_spectra(band, 3)
    gap = spec.gap.copy()
    gap[2] = 0.0
    res = adiabatic(band, spec.eigs, spec.ends, gap, np.full(8, 0.01), 3, plateau_below=0.5)
    assert np.isnan(res.A[2]) and res.regime[2] == REGIME_UNDEFINED
    assert res.plateau_below == 0.5


def test_stability_with_canonical_delta() -> None:
    rng = np.random.default_rng(16)
    U = rng.standard_normal((15, 20))
    W = 4
    band = band_from_updates(U, W + 1)
    spec = compute_spectra(band, W)
    d = delta_fro_canonical(band, spec.ends, W)
    s = stability_coefficients(spec.eigs, d)
    assert np.isnan(s[0]).all()
    lam = spec.eigs[3]
    gaps = np.array([min(abs(lam[j] - lam[k]) for k in range(W) if k != j) for j in range(W)])
    np.testing.assert_allclose(s[3], 1.0 - d[3] ** 2 / gaps**2, rtol=1e-12)
