"""Tests for phasewatch.analysis.gram (band route vs. brute force / snapshot route)."""

from __future__ import annotations

import numpy as np
import pytest

from phasewatch.analysis.gram import (
    Spectra,
    band_from_updates,
    bbp_ratio,
    bbp_reference,
    compute_spectra,
    g23,
    gap_position,
    global_band,
    gram_spectra,
    singular_values,
    spectra_from_updates,
    stability_coefficients,
    window_grams,
    window_singular_values,
)


def planted_updates(
    rng: np.random.Generator,
    T: int = 40,
    P: int = 500,
    scales: tuple[float, ...] = (10.0, 7.0, 5.0),
    noise: float = 0.05,
) -> np.ndarray:
    """U = C diag(scales) V^T + noise, V orthonormal (P x r): a clear gap after r modes."""
    r = len(scales)
    V, _ = np.linalg.qr(rng.standard_normal((P, r)))
    C = rng.standard_normal((T, r))
    return (C * np.asarray(scales)) @ V.T + noise * rng.standard_normal((T, P))


def brute_sigma(U: np.ndarray, W: int) -> np.ndarray:
    T = U.shape[0]
    out = []
    for r in range(W - 1, T):
        s = np.linalg.svd(U[r - W + 1 : r + 1], compute_uv=False)
        out.append(np.concatenate([s, np.zeros(W - s.size)]))
    return np.array(out)


def brute_kstar(sigma_row: np.ndarray, weighted: bool, rel_floor: float = 1e-10) -> int:
    best, best_j = -np.inf, 0
    total = sigma_row.sum()
    for j in range(len(sigma_row) - 1):
        if not sigma_row[j + 1] > rel_floor * sigma_row[0]:
            continue
        score = sigma_row[j] / sigma_row[j + 1]
        if weighted:
            score *= sigma_row[j] / total
        if score > best:
            best, best_j = score, j + 1
    return best_j


# --------------------------------------------------------------------------- #
def test_band_from_updates_exact() -> None:
    rng = np.random.default_rng(0)
    U = rng.standard_normal((12, 7))
    band = band_from_updates(U, 5)
    assert band.shape == (12, 5) and band.dtype == np.float64
    for r in range(12):
        for j in range(5):
            if r - j < 0:
                assert np.isnan(band[r, j])
            else:
                assert band[r, j] == pytest.approx(U[r] @ U[r - j], rel=1e-13)


def test_per_layer_band_sums_to_global() -> None:
    rng = np.random.default_rng(1)
    U = rng.standard_normal((15, 20))
    per_layer = band_from_updates(U, 4, layer_sizes=[5, 0, 15])
    glob = band_from_updates(U, 4)
    assert per_layer.shape == (15, 3, 4)
    np.testing.assert_allclose(global_band(per_layer), glob, rtol=1e-12, equal_nan=True)
    a = compute_spectra(per_layer, 3)
    b = compute_spectra(glob, 3)
    np.testing.assert_allclose(a.eigs, b.eigs, rtol=1e-10)
    # per-layer grams are the layer-restricted Gram matrices
    grams, ends = window_grams(per_layer, 3)
    assert grams.shape == (13, 3, 3, 3)
    Xw = U[ends[4] - 2 : ends[4] + 1, 5:]
    np.testing.assert_allclose(grams[4, 2], Xw @ Xw.T, rtol=1e-12)


def test_window_grams_entries_match_outer_products() -> None:
    rng = np.random.default_rng(2)
    T, P, W, K = 20, 50, 5, 7
    U = rng.standard_normal((T, P))
    grams, ends = window_grams(band_from_updates(U, K), W)
    assert grams.shape == (T - W + 1, W, W)
    np.testing.assert_array_equal(ends, np.arange(W - 1, T))
    for n, r in enumerate(ends):
        X = U[r - W + 1 : r + 1]
        np.testing.assert_allclose(grams[n], X @ X.T, rtol=1e-12, atol=1e-12)


def test_band_route_equals_snapshot_route_and_svd() -> None:
    rng = np.random.default_rng(3)
    T, P, W, K = 40, 500, 8, 10
    U = planted_updates(rng, T, P)
    spec = compute_spectra(band_from_updates(U, K), W, n_params=P)
    snap = spectra_from_updates(U, W)
    brute = brute_sigma(U, W)
    assert isinstance(spec, Spectra) and spec.source == "band" and snap.source == "snapshot"
    assert spec.valid.all() and len(spec) == T - W + 1
    # relative error w.r.t. the largest singular value of each window
    err = np.abs(spec.sigma - brute) / brute[:, :1]
    assert err.max() < 1e-10
    np.testing.assert_allclose(snap.sigma, brute, rtol=1e-12, atol=1e-12 * brute.max())
    # eigenvalues descending
    assert np.all(np.diff(spec.eigs, axis=1) <= 0)
    # gap positions: both variants, against brute force and across routes
    for n in range(len(spec)):
        assert spec.kstar[n] == brute_kstar(brute[n], weighted=False)
        assert spec.kstar_weighted[n] == brute_kstar(brute[n], weighted=True)
    np.testing.assert_array_equal(spec.kstar, snap.kstar)
    np.testing.assert_array_equal(spec.kstar_weighted, snap.kstar_weighted)
    np.testing.assert_allclose(spec.ratio, snap.ratio, rtol=1e-8)
    np.testing.assert_allclose(spec.bbp, snap.bbp, rtol=1e-8)
    # planted rank 3 -> clear gap at k = 3 (plain variant)
    assert np.all(spec.kstar == 3)
    idx = np.arange(len(spec))
    k = spec.kstar - 1
    np.testing.assert_allclose(spec.ratio, brute[idx, k] / brute[idx, k + 1], rtol=1e-8)
    np.testing.assert_allclose(spec.gap, brute[idx, k] - brute[idx, k + 1], rtol=1e-8)
    np.testing.assert_allclose(spec.g23, brute[:, 1] ** 2 - brute[:, 2] ** 2, rtol=1e-8)


def test_planted_spectrum_kstar_three() -> None:
    """Every window has exactly the singular values (9, 8, 7, 0.5, 0.4, 0.3)."""
    rng = np.random.default_rng(4)
    W, P = 6, 40
    s = np.array([9.0, 8.0, 7.0, 0.5, 0.4, 0.3])
    L, _ = np.linalg.qr(rng.standard_normal((W, W)))
    R, _ = np.linalg.qr(rng.standard_normal((P, W)))
    U = (L * s) @ R.T
    spec = compute_spectra(band_from_updates(U, W), W)
    assert spec.kstar.tolist() == [3]
    assert spec.kstar_weighted.tolist() == [3]
    np.testing.assert_allclose(spec.sigma[0], s, rtol=1e-10)
    assert spec.ratio[0] == pytest.approx(7.0 / 0.5, rel=1e-10)
    assert spec.gap[0] == pytest.approx(6.5, rel=1e-10)
    assert spec.g23[0] == pytest.approx(64.0 - 49.0, rel=1e-10)


def test_weighted_variant_can_differ_from_plain() -> None:
    sigma = np.array([[10.0, 1.0, 0.05, 0.02]])
    # plain: ratios 10, 20, 2.5 -> k*=2 ; weighted: 10*10/11.07 > 20*1/11.07 -> k*=1
    assert gap_position(sigma, "plain")[0].tolist() == [2]
    k, ratio, gap = gap_position(sigma, "weighted")
    assert k.tolist() == [1]
    assert ratio[0] == pytest.approx(10.0) and gap[0] == pytest.approx(9.0)


def test_gap_position_floor_and_undefined_rows() -> None:
    sigma = np.array(
        [
            [1.0, 0.5, 1e-12, 0.0],  # j=3,4 below floor -> only j=1,2 qualify
            [0.0, 0.0, 0.0, 0.0],  # nothing qualifies
            [np.nan, np.nan, np.nan, np.nan],
            [3.0, 3.0, 3.0, 3.0],  # ties -> first
        ]
    )
    k, ratio, gap = gap_position(sigma)
    assert k.tolist() == [1, 0, 0, 1]
    assert ratio[0] == pytest.approx(2.0) and gap[0] == pytest.approx(0.5)
    assert np.isnan(ratio[1:3]).all() and np.isnan(gap[1:3]).all()
    assert ratio[3] == 1.0 and gap[3] == 0.0
    with pytest.raises(ValueError):
        gap_position(sigma, "bogus")  # type: ignore[arg-type]


def test_nan_rows_invalidate_only_touching_windows() -> None:
    rng = np.random.default_rng(5)
    T, P, W, K = 30, 60, 4, 6
    U = rng.standard_normal((T, P))
    U[12] = np.nan  # an unknown update in the middle
    band = band_from_updates(U, K)
    band[:3] = np.nan  # first three rows not recorded at all
    spec = compute_spectra(band, W)
    ends = spec.ends
    starts = ends - W + 1
    expected_valid = (starts > 2) & ~((starts <= 12) & (12 <= ends))
    np.testing.assert_array_equal(spec.valid, expected_valid)
    assert np.isnan(spec.eigs[~expected_valid]).all()
    assert (spec.kstar[~expected_valid] == 0).all()
    assert np.isnan(spec.ratio[~expected_valid]).all()
    brute = brute_sigma(np.nan_to_num(U), W)
    np.testing.assert_allclose(
        spec.sigma[expected_valid], brute[expected_valid], rtol=1e-9, atol=1e-9
    )
    # the snapshot route agrees on which windows are valid
    snap = spectra_from_updates(U, W)
    np.testing.assert_array_equal(snap.valid, ~((starts <= 12) & (12 <= ends)))


def test_window_larger_than_band_raises() -> None:
    band = band_from_updates(np.ones((10, 3)), 4)
    with pytest.raises(ValueError, match=r"W=5.*K=4"):
        window_grams(band, 5)
    with pytest.raises(ValueError):
        compute_spectra(band, 5)


def test_window_two_edge_case() -> None:
    rng = np.random.default_rng(6)
    U = rng.standard_normal((10, 15))
    spec = compute_spectra(band_from_updates(U, 2), 2, n_params=15)
    assert spec.eigs.shape == (9, 2)
    assert set(spec.kstar.tolist()) == {1}
    assert np.isnan(spec.g23).all()
    np.testing.assert_allclose(spec.sigma, brute_sigma(U, 2), rtol=1e-10)
    np.testing.assert_allclose(spec.ratio, spec.sigma[:, 0] / spec.sigma[:, 1], rtol=1e-12)
    assert spec.bbp is not None and np.isfinite(spec.bbp).all()


def test_window_one_and_short_series() -> None:
    U = np.arange(12.0).reshape(4, 3)
    spec = compute_spectra(band_from_updates(U, 3), 1)
    assert spec.kstar.tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(spec.sigma[:, 0], np.linalg.norm(U, axis=1))
    assert len(compute_spectra(band_from_updates(U, 3), 3)) == 2
    assert len(compute_spectra(band_from_updates(U[:2], 3), 3)) == 0
    sig, ends = window_singular_values(U[:2], 3)
    assert sig.shape == (0, 3) and ends.size == 0


def test_snapshot_route_when_p_smaller_than_window() -> None:
    rng = np.random.default_rng(7)
    U = rng.standard_normal((12, 3))
    spec = compute_spectra(band_from_updates(U, 5), 5)
    snap = spectra_from_updates(U, 5)
    assert np.allclose(snap.sigma[:, 3:], 0.0)
    np.testing.assert_allclose(spec.sigma[:, :3], snap.sigma[:, :3], rtol=1e-10)
    assert np.all(spec.sigma[:, 3:] < 1e-6)


def test_gram_spectra_and_singular_values() -> None:
    g = np.array([[[2.0, 0.0], [0.0, 5.0]], [[np.nan, 0.0], [0.0, 1.0]]])
    lam = gram_spectra(g)
    np.testing.assert_allclose(lam[0], [5.0, 2.0])
    assert np.isnan(lam[1]).all()
    np.testing.assert_allclose(singular_values(np.array([4.0, -1e-15, np.nan]))[:2], [2.0, 0.0])
    assert np.isnan(singular_values(np.array([np.nan])))[0]
    assert np.isnan(g23(np.ones((3, 2)))).all()


def test_bbp_noise_and_spike() -> None:
    rng = np.random.default_rng(8)
    T, P, W = 40, 2000, 8
    m = W - 1
    noise = rng.standard_normal((T, P))
    spec = compute_spectra(band_from_updates(noise, W), W, n_params=P)
    ref = bbp_reference(spec.eigs, P)
    np.testing.assert_allclose(bbp_ratio(spec.eigs, P, W), ref.ratio)
    np.testing.assert_allclose(spec.bbp, ref.ratio)
    # nu recovers the per-coordinate noise scale (lower-half estimator biased a bit low)
    assert 0.85 < np.median(ref.nu) < 1.05
    # pure noise: the top singular value sits at the bulk edge ...
    assert 0.9 < np.median(ref.edge_ratio[:, 0]) < 1.1
    # ... so sigma_1 / d_crit is O(1) but equals (P/m)^{1/4} + (m/P)^{1/4}, not 1
    expected_noise = (P / m) ** 0.25 + (m / P) ** 0.25
    assert 0.85 < np.median(ref.ratio[:, 0]) / expected_noise < 1.15

    # planted spike with signal strength 10 d_crit
    v = rng.standard_normal(P)
    v /= np.linalg.norm(v)
    d = 10.0 * (P * m) ** 0.25
    c = rng.standard_normal((T, 1))
    spiked = noise + (d / np.sqrt(W)) * c * v
    spec2 = compute_spectra(band_from_updates(spiked, W), W, n_params=P)
    ref2 = bbp_reference(spec2.eigs, P)
    assert np.median(ref2.ratio[:, 0]) > 2.0 * expected_noise
    assert np.median(ref2.edge_ratio[:, 0]) > 2.0
    # the calibrated spike strength is ~ d * ||c_window|| / sqrt(W) / d_crit ~ 10
    assert 5.0 < np.median(ref2.spike_ratio[:, 0]) < 15.0
    assert np.isnan(ref2.spike_ratio[:, 2]).mean() > 0.5  # bulk modes below the edge
    with pytest.raises(ValueError):
        bbp_ratio(spec.eigs, P, W + 1)


def test_stability_coefficients_brute_force() -> None:
    rng = np.random.default_rng(9)
    eigs = -np.sort(-rng.standard_normal((6, 5)) ** 2, axis=1)
    delta = rng.uniform(0.0, 0.3, 6)
    s = stability_coefficients(eigs, delta)
    for n in range(6):
        for j in range(5):
            gap = min(abs(eigs[n, j] - eigs[n, k]) for k in range(5) if k != j)
            assert s[n, j] == pytest.approx(1.0 - delta[n] ** 2 / gap**2, rel=1e-12)
    # NaN propagates; degenerate pair gives -inf
    eigs2 = np.array([[3.0, 1.0, 1.0], [np.nan] * 3])
    s2 = stability_coefficients(eigs2, np.array([0.5, 0.5]))
    assert s2[0, 0] == pytest.approx(1.0 - 0.25 / 4.0)
    assert s2[0, 1] == -np.inf and s2[0, 2] == -np.inf
    assert np.isnan(s2[1]).all()
