"""add_gram64: the chunked float64 Gram of lower-precision samples against exact arithmetic."""

import pytest
import torch

from phasewatch.record.gram import _CHUNKED_ABOVE, _SCRATCH, add_gram64

U = 2.0 ** -53


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_integer_samples_exact(dtype):
    # integer entries |g| <= 64: every product and partial sum is an integer below 2^53, so any
    # summation order gives the exact Gram; the chunked route (n·m above 2^21) must give it bit for bit
    n, m = 8, 3 * _CHUNKED_ABOVE * _SCRATCH // 8 + 77
    g = torch.randint(-64, 65, (n, m), generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = torch.zeros(n, n, dtype=torch.float64)
    gi = g.to(torch.int64)
    for i in range(n):
        exact[i] = (gi[i] * gi).sum(dim=1).to(torch.float64)
    out = add_gram64(g, torch.full((n, n), 3.0, dtype=torch.float64))
    assert torch.equal(out, exact + 3.0)


def test_random_samples_within_bound():
    # the float64 GEMM of the cast samples and the chunked sum are both within γ_m Σ|g_ik g_jk| of the
    # exact Gram (products exact, sums float64 in some order), so they differ by at most twice that
    n, m = 16, _CHUNKED_ABOVE * _SCRATCH // 16 + 40_001
    g = torch.randn(n, m, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, m)
    ref = g.double() @ g.double().T
    out = add_gram64(g, torch.zeros(n, n, dtype=torch.float64))
    gam = (m + 1) * U / (1 - (m + 1) * U)
    bound = 2 * gam * (g.double().abs() @ g.double().abs().T)
    assert ((out - ref).abs() <= bound).all()
    assert torch.equal(out, out.T)


def test_float64_and_small_unchanged():
    # float64 samples, and samples below the scratch size, take the single GEMM bit for bit
    for n, m, dt in ((4, 100_000, torch.float64), (4, 100_000, torch.float32)):
        g = torch.randn(n, m, dtype=dt, generator=torch.Generator().manual_seed(2))
        g64 = g.to(torch.float64)
        assert torch.equal(add_gram64(g, torch.zeros(n, n, dtype=torch.float64)),
                           torch.zeros(n, n, dtype=torch.float64) + g64 @ g64.T)
