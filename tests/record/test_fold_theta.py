"""Projected mode folds θ_t itself: fold(θ_t) − fold(θ_{t−1}) against the exactly rounded fold of u_t.

Ground truth is ``math.fsum`` (an exactly rounded sum) of the signed parameter values, so the only
error left is the recorder's; the bound is projection.fold_float64's (γ_L·Σ|θ|, L = c + ⌈m/c⌉),
propagated through the band's inner products.  A float32 fold of θ is checked to fail the same bound
by orders of magnitude, so the test can tell a float64 accumulation from a float32 one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.record.projection import fold_error_bound, fold_float64, fold_signs

U = 2.0 ** -53


def _exact_fold(vals: list[np.ndarray], coefs: list[float], signs: np.ndarray, d: int) -> np.ndarray:
    """Σ_j coefs[j]·fold(vals[j]), each coordinate one exactly rounded fsum (coefs are ±1)."""
    out = np.empty(d)
    idx = np.arange(signs.size) % d
    for i in range(d):
        sel = idx == i
        terms = [c * s * float(v) for x, c in zip(vals, coefs) for v, s in zip(x[sel], signs[sel])]
        out[i] = math.fsum(terms)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,d,c", [(10_000, 64, 7), (4096, 64, 64), (300, 64, 1), (50, 64, 4)])
def test_fold_float64_within_its_bound(dtype, n, d, c):
    gen = torch.Generator().manual_seed(n + d + c)
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 5).to(dtype)  # offset: |x| ≫ fold(x)/√m
    s = fold_signs(n, seed=1, index=2, dtype=dtype, device=torch.device("cpu"))
    buf = torch.empty(c + 1, d, dtype=torch.float64)
    out = fold_float64(x, s, d, torch.empty(d, dtype=torch.float64), buf)
    xs, ss = x.to(torch.float64).numpy(), s.to(torch.float64).numpy()
    ref = _exact_fold([xs], [1.0], ss, d)
    abs_fold = torch.zeros(d, dtype=torch.float64).index_add_(0, torch.arange(n) % d, x.abs().to(torch.float64))
    bound = fold_error_bound(abs_fold, n, d, c).numpy() + U * np.abs(ref)
    assert np.all(np.abs(out.numpy() - ref) <= bound)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5))


def test_band_of_folded_theta_against_exact_fold_of_updates(tmp_path):
    """A real run in projected mode with θ ≫ u (weights offset by 4, lr 1e-4): the band of every
    folded tensor equals ⟨D_t, D_{t−j}⟩ of the exactly rounded folds D_t of the updates within the
    bound propagated from fold_float64's; a float32 fold of θ misses it by far."""
    model = _mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(4.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(96, 40, generator=gen), torch.randint(0, 5, (96,), generator=gen)
    d, k, steps = 64, 4, 24
    rec = phasewatch.Recorder(tmp_path / "r", model, opt, k=k, block=8, mode="projected", proj_dim=d, strict=True)
    assert rec._fold_theta and [rec.param_names[i] for i in rec._folded] == ["0.weight", "2.weight"]
    thetas = [[p.detach().clone() for p in rec.params]]
    for s in range(steps):
        part = slice((s * 32) % 96, (s * 32) % 96 + 32)
        loss = torch.nn.functional.cross_entropy(model(xs[part]), ys[part])
        loss.backward()
        opt.step()
        opt.zero_grad()
        thetas.append([p.detach().clone() for p in rec.params])
    c = rec._fold_buf.shape[0] - 1
    rec.close()
    band = phasewatch.open_run(tmp_path / "r").band["layer_band"]  # (steps, groups, K): a group per tensor
    for i in rec._folded:
        n = rec.params[i].numel()
        sg = rec._signs[i].to(torch.float64).numpy()
        th = [t[i].reshape(-1).to(torch.float64).numpy() for t in thetas]
        D = np.stack([_exact_fold([th[t], th[t - 1]], [1.0, -1.0], sg, d) for t in range(1, steps + 1)])
        idx = torch.arange(n) % d
        absf = [fold_error_bound(torch.zeros(d, dtype=torch.float64).index_add_(0, idx, torch.from_numpy(np.abs(x))),
                                 n, d, c).numpy() for x in th]
        e = np.stack([absf[t] + absf[t - 1] + 2 * U * np.abs(D[t - 1]) for t in range(1, steps + 1)])  # |ring − D|
        en, dn = np.linalg.norm(e, axis=1), np.linalg.norm(D, axis=1)
        worst32 = 0.0
        for t in range(steps):
            for j in range(min(k, t + 1)):
                ref = D[t] @ D[t - j]
                rn = (dn[t] + en[t]) * (dn[t - j] + en[t - j])
                bound = en[t] * dn[t - j] + dn[t] * en[t - j] + en[t] * en[t - j] + 2 * d * U * rn
                assert abs(band[t, i, j] - ref) <= bound, (i, t, j, band[t, i, j], ref, bound)
            # the same difference with float32 sums of θ (what the float64 accumulation avoids)
            f32 = [torch.sum((thetas[t + a][i].reshape(-1) * rec._signs[i])[: (n // d) * d].view(-1, d), 0)
                   for a in (0, 1)]
            diff32 = (f32[1] - f32[0]).to(torch.float64).numpy()
            tail = n - (n // d) * d
            if tail == 0:
                worst32 = max(worst32, np.linalg.norm(diff32 - D[t]) / en[t])
        if n % d == 0:
            assert worst32 > 100, worst32  # float32 would miss the bound by > 100×
