"""The momentum null and the dimensionless A_dk against ground truth (issue 17).

Ground truths: the dense eigendecomposition of the Toeplitz matrix β^|i−j| (the values of
DEFINITIONS §1); the update autocorrelation of the real torch optimizers fed white noise (measured
over many independent coordinates, tolerance from the Monte Carlo standard error); pure-noise and
planted-signal runs recorded with the real Recorder; the exact scaling of a trajectory.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

import phasewatch
from phasewatch.analysis import adiabatic as adia
from phasewatch.analysis import gram, nulls
from phasewatch.analysis.pipeline import analyze_band, null_reading, run_null
from phasewatch.errors import PhasewatchError

EPS = np.finfo(np.float64).eps
DATA = Path(__file__).resolve().parents[2] / "data"


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, value", [(0.9, "2.247"), (0.95, "3.148"), (0.99, "7.00")])
def test_toeplitz_values_at_w10(beta, value):
    W = 10
    rho = nulls.filter_autocorrelation(beta, np.arange(W))
    np.testing.assert_array_equal(rho, beta ** np.arange(W))  # heavy ball: β^j
    lam = np.linalg.eigvalsh(scipy.linalg.toeplitz(beta ** np.arange(W)))[::-1]  # dense reference
    ref = math.sqrt(lam[0] / lam[1])
    res = nulls.momentum_null(np.ones((1, W)), np.array([1]), np.array([ref]), np.array([lam[1] - lam[2]]),
                              rho, draws=0)
    got = float(res.gap_ratio_null[0])
    # eigenvalues of a W×W symmetric matrix to ~W·eps·λ1 absolute: relative error of the ratio ≲ W·eps·λ1/λ2
    assert abs(got - ref) <= 4 * W * EPS * lam[0] / lam[1] * ref
    digits = len(value.split(".")[1])
    assert round(got, digits) == float(value)  # the values DEFINITIONS §1 quotes, to their digits
    assert res.kstar_null[0] == 1 and abs(res.gap_excess[0] - 1) <= 4 * W * EPS * lam[0] / lam[1]
    assert abs(res.g23_excess[0] - 1) <= 4 * W * EPS * lam[0] / (lam[1] - lam[2])


def test_optimizer_nulls_from_recorded_hyper_parameters():
    hb = nulls.null_from_optimizer("SGD", {"momentum": 0.9, "dampening": 0.5})
    assert hb.kind == "heavy ball" and "rescales only" in hb.source
    np.testing.assert_array_equal(hb.rho(6), 0.9 ** np.arange(6))  # dampening does not enter
    nest = nulls.null_from_optimizer("SGD", {"momentum": 0.9, "nesterov": True})
    b = 0.9  # the closed form of the module docstring: ρ(j) = β^{j+1}(1+β−β²)/(1+2β−2β³)
    want = b ** (np.arange(1, 6) + 1) * (1 + b - b * b) / (1 + 2 * b - 2 * b ** 3)
    np.testing.assert_allclose(nest.rho(6)[1:], want, rtol=16 * EPS)
    assert nulls.null_from_optimizer("AdamW", {"betas": [0.85, 0.99]}).rho(3)[1] == 0.85
    assert nulls.null_from_optimizer("SGD", {"momentum": 0}).kind == "none"
    assert nulls.null_from_optimizer("Adagrad", {}).kind == "none"
    assert nulls.null_from_optimizer("Adam", {"betas": [0.9, 0.999]}, override="none").beta == 0.0
    assert nulls.null_from_optimizer("Adam", {}, override=0.5).rho(3)[2] == 0.25
    with pytest.raises(PhasewatchError, match="null="):
        nulls.null_from_optimizer("Adam", {}, override="momentun")
    with pytest.raises(PhasewatchError, match="beta"):
        nulls.null_from_optimizer("SGD", {"momentum": 1.0})


def test_muon_null_is_nesterov_by_default_in_the_installed_torch():
    torch = pytest.importorskip("torch")
    sig = inspect.signature(torch.optim.Muon)
    assert sig.parameters["nesterov"].default is True
    mu = sig.parameters["momentum"].default
    null = nulls.null_from_optimizer("Muon", {"momentum": mu, "nesterov": True})
    assert null.kind == "nesterov" and null.beta == mu and "Newton-Schulz" in null.neglected
    assert nulls.null_from_optimizer("Muon", {"momentum": mu, "nesterov": False}).kind == "heavy ball"


def _pooled_autocorr(u: np.ndarray, lags: int) -> tuple[np.ndarray, np.ndarray]:
    """ρ̂(j) = Σ_t⟨u_t, u_{t−j}⟩ / Σ_t‖u_t‖² and its standard error by the delta method over the
    coordinates (independent replicates of the same process)."""
    T = u.shape[0]
    den = (u * u).sum(axis=0) / T  # per coordinate
    est, se = np.ones(lags), np.zeros(lags)
    for j in range(1, lags):
        num = (u[j:] * u[: T - j]).sum(axis=0) / T
        r = num.mean() / den.mean()
        est[j] = r
        se[j] = np.std(num - r * den, ddof=1) / math.sqrt(u.shape[1]) / den.mean()
    return est, se


def _torch_updates(opt_cls, kw, steps, dim, stride, seed=0, burn=300):
    """Displacements θ_t − θ_{t−stride} of a real torch optimizer fed white Gaussian gradients."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    opt = opt_cls([p], **kw)
    thetas = []
    for t in range(burn + steps * stride + 1):
        p.grad = torch.randn(dim, generator=g, dtype=torch.float64)
        opt.step()
        if t >= burn:
            thetas.append(p.detach().clone().numpy())
    th = np.asarray(thetas)[::stride]
    return np.diff(th, axis=0)


@pytest.mark.parametrize("kw, stride", [({"momentum": 0.9, "nesterov": True}, 1),
                                        ({"momentum": 0.9, "nesterov": True}, 2),
                                        ({"momentum": 0.8, "dampening": 0.4}, 3)])
def test_sgd_nesterov_stride_and_dampening_equal_the_real_optimizer(kw, stride):
    torch = pytest.importorskip("torch")
    u = _torch_updates(torch.optim.SGD, dict(lr=0.01, **kw), steps=1500, dim=400, stride=stride)
    null = nulls.null_from_optimizer("SGD", kw, stride=stride)
    est, se = _pooled_autocorr(u, 6)
    # 5 standard errors: a false failure has probability < 1e-6 per lag
    assert np.all(np.abs(est - null.rho(6)) <= 5 * se + 1e-12), (est, null.rho(6), se)
    # the module's own simulator of the filter agrees too (its recursion is the formula's premise)
    sim = nulls.simulate_filtered_noise(1500, 400, null, seed=1)
    est2, se2 = _pooled_autocorr(sim, 6)
    assert np.all(np.abs(est2 - null.rho(6)) <= 5 * se2 + 1e-12)


@pytest.mark.parametrize("name", ["Adam", "NAdam"])
def test_adam_and_nadam_first_moment_with_a_constant_denominator(name):
    """With eps ≫ √v̂ the denominator is constant, so what is left is the first-moment filter the null
    models (heavy ball β₁ for Adam; NAdam's Nesterov-type weights with μ_t at each step)."""
    torch = pytest.importorskip("torch")
    cls = getattr(torch.optim, name)
    burn, steps = 2000, 600
    u = _torch_updates(cls, dict(lr=1.0, betas=(0.9, 0.999), eps=1e6), steps=steps, dim=400, stride=1, burn=burn)
    null = nulls.null_from_optimizer(name, {"betas": [0.9, 0.999], "momentum_decay": 0.004})
    est, se = _pooled_autocorr(u, 6)
    rho = np.atleast_2d(null.rho_at(6, np.arange(burn, burn + steps)))
    # NAdam's μ_t moves over the steps: the estimate is within the range ρ takes over them
    lo, hi = rho.min(axis=0), rho.max(axis=0)
    assert np.all(est >= lo - 5 * se - 1e-12) and np.all(est <= hi + 5 * se + 1e-12), (est, lo, hi, se)


def test_wishart_draws_have_identity_mean():
    W, D = 6, 4000
    for d in (3.0, 50.0, 1e5):
        S = nulls.wishart_draws(W, d, D, seed=2)
        se = np.sqrt((1.0 + np.eye(W)) / d / D)  # Var S_ij = (1 + δ_ij)/d for a Wishart(d, I)/d
        assert np.all(np.abs(S.mean(axis=0) - np.eye(W)) <= 5 * se)


def test_band_false_alarm_rate_on_simulated_noise():
    """Windows of momentum-filtered Gaussian noise in d coordinates land above the band at the
    rate 1 − level (binomial and Monte Carlo quantile errors, 4 standard errors)."""
    W, d, N, gap = 10, 40, 400, 60  # windows 60 steps apart: ρ(50) = 0.9^50 < 0.01 between them
    null = nulls.null_from_optimizer("SGD", {"momentum": 0.9})
    u = nulls.simulate_filtered_noise(N * gap, d, null, seed=3)
    X = np.stack([u[i * gap: i * gap + W] for i in range(N)])  # (N, W, d)
    lam = gram.gram_spectra(X @ np.swapaxes(X, 1, 2))
    k, R, _ = gram.gap_position(gram.singular_values(lam))
    norms = np.linalg.norm(X, axis=2)
    res = nulls.momentum_null(norms, k, R, gram.g23(lam), null.rho(W), dim=d, draws=400, level=0.95, seed=4)
    frac = float(res.above_null.mean())
    se = math.sqrt(0.05 * 0.95 / N + 0.05 * 0.95 / 400)
    assert abs(frac - 0.05) <= 4 * se, frac
    assert abs(np.median(res.gap_excess) - 1) < 0.1


def _noise_windows(beta: float, d: float, N: int, seed: int):
    """N windows of the Gram of momentum-filtered noise in d coordinates (exact Wishart draws), with
    norms that vary within and between windows; returns norms, ρ and the observed k*, ratio, g23."""
    W = 10
    rng = np.random.default_rng(seed)
    rho = beta ** np.arange(W)
    n = np.exp(rng.normal(0, 0.2, (N, W))) * np.linspace(1, 0.5, W)[None] ** rng.uniform(0, 1, (N, 1))
    M = n[:, :, None] * nulls._sqrt_psd(nulls._toeplitz(rho, W))
    lam = gram.gram_spectra(M @ nulls.wishart_draws(W, d, N, seed + 1) @ np.swapaxes(M, 1, 2))
    k, R, _ = gram.gap_position(gram.singular_values(lam))
    return n, rho, k, R, gram.g23(lam)


@pytest.mark.parametrize("beta", [0.9, 0.99])
def test_analytic_band_equals_the_exact_monte_carlo_band_at_large_d(beta):
    """At d ≥ FIRST_ORDER_DIM the band's upper end is r⁰_max·exp(Φ⁻¹(level)/√d) (first-order
    perturbation, DEFINITIONS §1 null); against 4000 exact Wishart draws per window its width
    (hi − r⁰_max) agrees to a few % (measured ~3% narrower: the neglected second-order shifts are
    O(W/√d) of the width), windows with near-degenerate null eigenvalues (first-order draws, 64 of
    them: a noisier quantile) to 25%."""
    d = 1e4
    n, rho, k, R, g23 = _noise_windows(beta, d, 30, seed=1)
    fast = nulls.momentum_null(n, k, R, g23, rho, dim=d, level=0.95)
    lam0 = gram.gram_spectra(nulls.null_gram(n, rho))
    _, r0max, _ = gram.gap_position(gram.singular_values(lam0))
    S = nulls.wishart_draws(10, d, 4000, seed=9)
    exact = nulls._band_max_ratio(n, nulls._sqrt_psd(nulls._toeplitz(rho, 10)), S, 0.95, gram.DEFAULT_REL_FLOOR)
    width = (fast.gap_ratio_null_hi - r0max) / (exact - r0max)
    assert np.median(np.abs(width - 1)) < 0.06 and np.all(np.abs(width - 1) < 0.25), width


def test_analytic_band_false_alarm_rate_is_the_level():
    """Pure-noise windows at d = 1e4 land above the (deterministic) analytic band at rate 1 − level:
    binomial, 4 standard errors; the verdicts of the fast routes equal the all-exact route's except
    where the exact route's own 64-draw quantile noise moves its band."""
    N = 3000
    n, rho, k, R, g23 = _noise_windows(0.9, 1e4, N, seed=2)
    res = nulls.momentum_null(n, k, R, g23, rho, dim=1e4, level=0.95)
    se = math.sqrt(0.05 * 0.95 / N)
    assert abs(res.above_null.mean() - 0.05) <= 4 * se, res.above_null.mean()


def test_band_at_the_smallest_window():
    """W = 2 has a single gap ratio: the analytic route applies to it alone (no second ratio)."""
    rng = np.random.default_rng(0)
    n = np.exp(rng.normal(0, 0.1, (50, 2)))
    lam = np.sort(rng.uniform(0.5, 2.0, (50, 2)), axis=1)[:, ::-1]
    R = np.sqrt(lam[:, 0] / lam[:, 1])
    res = nulls.momentum_null(n, np.ones(50, dtype=int), R, np.full(50, np.nan), np.array([1.0, 0.9]), dim=1e4)
    assert np.all(np.isfinite(res.gap_ratio_null_hi)) and np.all(res.gap_ratio_null_hi >= res.gap_ratio_null)


def test_small_dimension_band_is_the_exact_monte_carlo_one_where_it_decides():
    """Below FIRST_ORDER_DIM, every window whose reading is near the band gets the exact Wishart band,
    so the verdicts equal the all-exact computation's (same seed, same draws)."""
    for beta, d in ((0.0, 64.0), (0.9, 20.0), (0.9, 300.0)):
        n, rho, k, R, g23 = _noise_windows(beta, d, 400, seed=3)
        R = R * np.where(np.arange(400) % 3 == 0, 1.6, 1.0)  # some readings well above the band
        fast = nulls.momentum_null(n, k, R, g23, rho, dim=d)
        lam0 = gram.gram_spectra(nulls.null_gram(n, rho))
        S = nulls.wishart_draws(10, d, nulls.DEFAULT_DRAWS, 0)
        hi = nulls._band_max_ratio(n, nulls._sqrt_psd(nulls._toeplitz(rho, 10)), S, nulls.DEFAULT_LEVEL,
                                   gram.DEFAULT_REL_FLOOR)
        np.testing.assert_array_equal(fast.above_null, np.isfinite(R) & (R > hi))
        assert np.isfinite(lam0).all()


# ------------------------------------------------------------------------------------------------
# real Recorder runs: pure noise reads the null, a planted signal reads above it
# ------------------------------------------------------------------------------------------------
def _linear_noise_run(path: Path, opt_fn, *, P=3000, T=300, signal=0.0, seed=0, stride=1) -> Path:
    """A linear loss ⟨θ, ξ_t + s·√P·v⟩ with fresh Gaussian ξ_t each step (and a fixed unit direction
    v: a persistent rank-one signal when s > 0), recorded with the real Recorder."""
    torch = pytest.importorskip("torch")

    class Vec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(P, dtype=torch.float64))

    torch.manual_seed(seed)
    m = Vec()
    opt = opt_fn(m.parameters())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(P, generator=g, dtype=torch.float64)
    v /= v.norm()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with phasewatch.Recorder(path, m, opt, k=12, stride=stride, strict=True, fsync="never") as rec:
            for _ in range(T):
                opt.zero_grad()
                xi = torch.randn(P, generator=g, dtype=torch.float64) + signal * math.sqrt(P) * v
                loss = (m.theta * xi).sum()
                loss.backward()
                rec.loss(loss)
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return path


def _opt(name):
    import torch

    return {"sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
            "nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.999)),
            "nadam": lambda p: torch.optim.NAdam(p, lr=1e-3)}[name]


@pytest.mark.parametrize("name", ["sgd", "adam", "nesterov"])
def test_pure_noise_reads_the_momentum_null(tmp_path, name):
    pytest.importorskip("torch")
    a = phasewatch.analyze(_linear_noise_run(tmp_path / name, _opt(name)), window=10)
    t = a.table
    late = t["valid"] & (t["step"] > 50)  # past the filter's start-up (and Adam's bias correction)
    assert abs(np.nanmedian(t["gap_excess"][late]) - 1) <= 0.1
    assert np.all(t["kstar_null"][late] == 1)
    assert a.null["beta"] == 0.9 and a.null["kind"] == ("nesterov" if name == "nesterov" else "heavy ball")
    assert "at the null: no structure beyond momentum" in a.summary()
    if name != "nesterov":  # heavy ball: the raw gap ratio itself sits at the Toeplitz value 2.247
        assert abs(np.nanmedian(t["gap_ratio"][late]) / 2.2466336 - 1) <= 0.1


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_planted_persistent_signal_reads_above_the_null(tmp_path, name):
    pytest.importorskip("torch")
    a = phasewatch.analyze(_linear_noise_run(tmp_path / name, _opt(name), signal=1.0), window=10)
    t = a.table
    late = t["valid"] & (t["step"] > 50)
    assert np.nanmedian(t["gap_excess"][late]) > 3
    assert t["above_null"][late].all()
    assert "above the momentum null by x" in a.summary()


def test_null_streams_bit_equal_and_exports(tmp_path):
    """Chunked analysis gives the in-memory null columns value for value (NAdam: ρ per window), and
    the CSV carries them."""
    pytest.importorskip("torch")
    path = _linear_noise_run(tmp_path / "nadam", _opt("nadam"), P=500, T=120, signal=0.3)
    whole = phasewatch.analyze(path, window=8)
    chunked = phasewatch.analyze(path, window=8, chunk_steps=7)
    assert whole.null["kind"] == "nadam"
    for k, v in whole.table.items():
        np.testing.assert_array_equal(chunked.table[k], v, err_msg=k)
    whole.to_csv(tmp_path / "t.csv")
    header = (tmp_path / "t.csv").read_text().splitlines()[1].split(",")
    for col in ("gap_ratio_null", "kstar_null", "gap_excess", "gap_ratio_null_hi", "above_null", "g23_excess",
                "A_dk", "regime_A"):
        assert col in header, col
    assert "null" in whole.conventions and "units 1/eta" in whole.conventions["A"]
    other = phasewatch.analyze(path, window=8, null=0.5, null_draws=0, regimes="A")
    np.testing.assert_array_equal(other.table["regime"], other.table["regime_A"])
    assert other.null["beta"] == 0.5
    none = phasewatch.analyze(path, window=8, null="none", null_draws=0)
    t = none.table
    v = t["valid"] & (t["kstar"] > 0)
    # β = 0: G⁰ = diag(‖u‖²), so the null's ratio at k* is a ratio of the window's sorted norms
    from phasewatch.store import open_run

    i = int(np.nonzero(v)[0][-1])
    b0 = np.asarray(open_run(path).band["band"])[:, 0]
    norms = np.sort(np.sqrt(b0[i: i + 8]))[::-1]  # the rows of window i (its end is row i + W − 1)
    k = t["kstar"][i]
    assert t["gap_ratio_null"][i] == pytest.approx(norms[k - 1] / norms[k], rel=16 * 8 * EPS)


def test_run_null_from_the_meta_of_a_run_written_before_the_null():
    """The shipped sample runs predate the null: their meta (optimizer class and hyper-parameters)
    gives it."""
    from phasewatch.store import open_run

    run = open_run(DATA / "grokking-p71.h5")
    null = run_null(run)
    assert null.kind == "heavy ball" and null.beta == run.meta["optimizer"]["hyper"]["betas"][0]


# ------------------------------------------------------------------------------------------------
# A_dk
# ------------------------------------------------------------------------------------------------
def _principal_sin(X0: np.ndarray, X1: np.ndarray, k: int) -> float:
    """Largest sin of the principal angles between the top-k right singular subspaces."""
    V0 = np.linalg.svd(X0, full_matrices=False)[2][:k].T
    V1 = np.linalg.svd(X1, full_matrices=False)[2][:k].T
    c = np.linalg.svd(V0.T @ V1, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - c.min() ** 2)))


def test_A_dk_bounds_the_rotation_and_is_invariant_under_lr_scaling():
    rng = np.random.default_rng(7)
    T, P, W = 80, 60, 6
    basis = rng.standard_normal((3, P))
    U = (rng.standard_normal((T, 3)) * [3.0, 1.5, 1.0]) @ basis + 0.3 * rng.standard_normal((T, P))
    eta = np.full(T, 0.01)
    band = gram.band_from_updates(U, W + 1)
    spec = gram.compute_spectra(band, W)
    dfro = adia.delta_fro_canonical(band, spec.ends, W)
    r = adia.adiabatic_ratio(dfro, spec.eigs, spec.kstar)
    ok = np.isfinite(r.A_dk)
    assert ok.sum() > 50
    # Davis–Kahan (Yu–Wang–Samworth 2015): sin θ_max ≤ ‖sin Θ‖_F ≤ 2‖ΔC‖_F/(λ_k − λ_k+1)
    for n in np.nonzero(ok)[0]:
        e, k = spec.ends[n], spec.kstar[n]
        s = _principal_sin(U[e - W: e], U[e - W + 1: e + 1], k)
        assert s <= 2 * r.A_dk[n] * (1 + 1e-9) + 1e-12
    # the same trajectory at 3× the learning rate: every update ×3
    c = 3.0
    band3 = gram.band_from_updates(c * U, W + 1)
    spec3 = gram.compute_spectra(band3, W)
    r3 = adia.adiabatic_ratio(adia.delta_fro_canonical(band3, spec3.ends, W), spec3.eigs, spec3.kstar)
    np.testing.assert_array_equal(spec3.kstar, spec.kstar)
    # rounding: band entries (P-term sums) to P·eps relative, eigenvalues to W·eps·λ₁ absolute, and the
    # cancellation in ‖ΔC‖² = n⁴ + o⁴ − 2c² amplifies by (n⁴ + o⁴)/‖ΔC‖²
    lam = spec.eigs[ok]
    gap = r.eigengap[ok]
    now, old = band[spec.ends[ok], 0], band[spec.ends[ok] - W, 0]
    amp = (now ** 2 + old ** 2) / dfro[ok] ** 2
    tol = 4 * EPS * (P + W * lam[:, 0] / gap + amp)
    np.testing.assert_array_less(np.abs(r3.A_dk[ok] / r.A_dk[ok] - 1), tol)
    # while the paper's A scales as 1/η
    A = adia.adiabatic(band, spec.eigs, spec.ends, spec.gap, eta, W).A
    A3 = adia.adiabatic(band3, spec3.eigs, spec3.ends, spec3.gap, c * eta, W).A
    np.testing.assert_allclose(A3[ok] * c, A[ok], rtol=float(tol.max()) * 4)
    # a power-of-two scale is exact in floating point: A_dk bit for bit
    band2 = gram.band_from_updates(2.0 * U, W + 1)
    spec2 = gram.compute_spectra(band2, W)
    r2 = adia.adiabatic_ratio(adia.delta_fro_canonical(band2, spec2.ends, W), spec2.eigs, spec2.kstar)
    np.testing.assert_allclose(r2.A_dk, r.A_dk, rtol=tol.max(), equal_nan=True)


def test_A_dk_regimes_in_the_table():
    rng = np.random.default_rng(8)
    U = rng.standard_normal((60, 40))
    band = gram.band_from_updates(U, 8)
    t = analyze_band(band, np.full(60, 0.1), np.arange(1, 61), window=5)
    ok = np.isfinite(t["A_dk"])
    np.testing.assert_array_equal(t["regime"], adia.classify_regime(t["A_dk"], 0.1, 1.0))
    np.testing.assert_array_equal(t["regime_A"], adia.classify_regime(t["A"], 0.1, 10.0))
    assert ok.sum() > 40 and "gap_excess" not in t  # arrays without an optimizer: no null asked


# ------------------------------------------------------------------------------------------------
# the shipped demo runs
# ------------------------------------------------------------------------------------------------
def test_demo_report_says_where_k_rises_above_the_null():
    from phasewatch.outputs.report import build_report, report_markdown

    rep = build_report(DATA / "grokking-p71.h5", window=10)
    text = report_markdown(rep)
    assert "above the null's band: steps" in text and "from momentum alone" in text
    a = phasewatch.analyze(DATA / "grokking-p71.h5", window=10)
    t = a.table
    v = t["valid"] & (t["kstar"] > 0)
    # gap_excess is the observed ratio over the null's, both at the observed k*
    from phasewatch.store import open_run

    b0 = np.asarray(open_run(DATA / "grokking-p71.h5").band["band"])[:, 0]
    norms = np.sqrt(np.lib.stride_tricks.sliding_window_view(b0, 10))  # (N, W): window n = rows n..n+9
    lam0 = np.stack([np.linalg.eigvalsh(np.outer(n, n) * scipy.linalg.toeplitz(0.9 ** np.arange(10)))[::-1]
                     for n in norms])  # dense, one window at a time
    sig0 = np.sqrt(np.maximum(lam0, 0))
    k = t["kstar"][v]
    rows = np.nonzero(v)[0]
    want = t["gap_ratio"][v] / (sig0[rows, k - 1] / sig0[rows, k])
    # both routes solve the same matrices: eigenvalue errors W·eps·λ1, so the ratio to W·eps·λ1/λ_k+1
    tol = 8 * 10 * EPS * lam0[rows, 0] / lam0[rows, k]
    assert np.all(np.abs(t["gap_excess"][v] / want - 1) <= tol)
    d = a.summary_dict()
    assert null_reading(d).startswith("k* and gap ratio")


def test_cli_analyze_null_option(tmp_path, capsys):
    from phasewatch.cli import main

    assert main(["analyze", str(DATA / "grokking-p71-no-wd.h5"), "--null", "0.95", "--out", str(tmp_path),
                 "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "from momentum alone (beta=0.95" in out and "A_dk" in out and "units 1/lr" in out
    head = (tmp_path / "analysis.csv").read_text().splitlines()
    assert "beta=0.95" in head[0] and "gap_excess" in head[1].split(",")
    assert main(["analyze", str(DATA / "grokking-p71-no-wd.h5"), "--null", "beta"]) == 1
    assert "--null 'beta'" in capsys.readouterr().err


def test_stride_run_reads_the_stride_null(tmp_path):
    """Displacements over 3 steps (Recorder(stride=3)) of SGD-momentum on pure noise: the null of the
    3-step sums (read from the run's meta) is what the run shows."""
    pytest.importorskip("torch")
    a = phasewatch.analyze(_linear_noise_run(tmp_path / "s3", _opt("sgd"), T=600, stride=3), window=8)
    assert a.null["stride"] == 3
    t = a.table
    late = t["valid"] & (t["step"] > 60)
    assert abs(np.nanmedian(t["gap_excess"][late]) - 1) <= 0.1
    # the heavy-ball null would be wrong here: 0.9^j instead of the 3-step sums' A·0.729^j
    hb = nulls.null_from_optimizer("SGD", {"momentum": 0.9})
    wrong = nulls.momentum_null(np.ones((1, 8)), np.array([1]), np.array([1.0]), np.array([1.0]), hb.rho(8),
                                draws=0).gap_ratio_null[0]
    assert abs(np.nanmedian(t["gap_ratio"][late]) / wrong - 1) > 0.1


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_A_dk_of_recorded_runs_is_invariant_under_the_learning_rate(tmp_path, name):
    """A linear loss makes every update proportional to η (SGD: −ηξ; Adam: −η m̂/(√v̂+ε), the moments
    do not depend on θ): the runs at η and 4η are the same trajectory scaled by 4, exactly in binary
    floating point.  A_dk is the same, the paper's A is divided by 4."""
    torch = pytest.importorskip("torch")
    lr = 2.0 ** -10
    cls = {"sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
           "adam": lambda p, lr: torch.optim.Adam(p, lr=lr, eps=0.0)}[name]
    runs = [phasewatch.analyze(_linear_noise_run(tmp_path / f"{name}{i}", lambda p, s=s: cls(p, s * lr),
                                                 P=400, T=80, signal=0.5), window=6)
            for i, s in enumerate((1.0, 4.0))]
    t1, t4 = runs[0].table, runs[1].table
    ok = np.isfinite(t1["A_dk"])
    assert ok.sum() > 60
    np.testing.assert_array_equal(t4["kstar"], t1["kstar"])
    np.testing.assert_allclose(t4["A_dk"][ok], t1["A_dk"][ok], rtol=64 * 400 * EPS)  # P·eps-level rounding
    np.testing.assert_allclose(4 * t4["A"][ok], t1["A"][ok], rtol=64 * 400 * EPS)
    np.testing.assert_array_equal(t4["regime"], t1["regime"])


def test_null_off_drops_only_the_null_columns_and_says_so(tmp_path):
    """null="off": every other column bit-identical to the default analysis, no null column, the
    summary, report and overview figure say there is no null instead of failing or reading one."""
    from phasewatch.outputs.report import build_report, report_markdown
    from phasewatch.plot import figures

    sample = DATA / "grokking-p71.h5"
    on, off = phasewatch.analyze(sample), phasewatch.analyze(sample, null="off")
    null_cols = {"kstar_null", "gap_ratio_null", "gap_excess", "gap_ratio_null_hi", "gap_excess_hi",
                 "above_null", "g23_null", "g23_excess"}
    assert set(on.table.columns) - set(off.table.columns) == null_cols
    for c in off.table.columns:
        assert np.array_equal(np.asarray(on.table[c]), np.asarray(off.table[c]), equal_nan=True), c
    assert off.null["kind"] == "off"
    assert "not judged against momentum alone" in off.summary()
    assert "gap_excess_median" not in off.summary_dict()
    assert "no momentum null" in off.conventions["null"]
    md = report_markdown(build_report(sample, analysis=off))
    assert "no momentum null" in md and "above the momentum null" not in md
    fig = figures.FIGURES["overview"](off)
    fig.savefig(tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 0
    with pytest.raises(PhasewatchError, match="'off'"):
        phasewatch.analyze(sample, null="of")


def test_null_band_says_its_dimension_when_n2_samples_cannot_estimate_it(tmp_path):
    """Gradient-noise rows with n = 2 give no participation ratio (no Tr(S^2) to correct): the band
    falls back to the recorded dimension and the summary says so, instead of calling the fallback
    a participation ratio."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    with phasewatch.Recorder(tmp_path / "r", model, opt, grad_samples_every=5, grad_source="micro_batch"):
        for _ in range(40):
            opt.zero_grad()
            for half in (slice(0, 32), slice(32, 64)):  # two micro-batches: n = 2 samples
                (torch.nn.functional.cross_entropy(model(x[half]), y[half]) / 2).backward()
            opt.step()
    a = phasewatch.analyze(tmp_path / "r")
    assert set(np.asarray(a.probes["n"]).tolist()) == {2}
    P = sum(p.numel() for p in model.parameters())
    assert a.null["dim"] == P
    assert "give no participation ratio" in a.null["dim_source"]
    assert f"null band    d_eff = the recorded dimension {P}" in a.summary()
