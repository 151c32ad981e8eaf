"""The notes' estimator of claims 4-9 (workflows/notes.py) against brute force.

- ``minibatch_gradients``: each row against the closed-form gradient of a linear least-squares loss
  on the same minibatch (the indices re-drawn from the same generator seed), with and without a mask.
- ``notes_ratio``: the notes' C = ||mean||^2 / sum of unbiased per-coordinate variances, computed
  by hand with numpy, and ours, (A - T/n)/T clipped at 0.
- ``hill_alpha_notes``: 1 / mean log(x_(i)/x_(k+1)) over the top k, by an explicit loop.

Tolerances: every quantity is a sum of at most ~10^3 float64 terms of magnitude O(1) (and a ratio of
two such), so the rounding error is below 10^3 · 2^-53 ≈ 1e-13 relative; 1e-10 leaves room.
"""

from __future__ import annotations

import numpy as np
import torch

from phasewatch.workflows.notes import hill_alpha_notes, minibatch_gradients, notes_ratio

RTOL = 1e-10


def _linear(d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(d, 1, bias=True).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(1, generator=g, dtype=torch.float64))
    x = torch.randn(50, d, generator=g, dtype=torch.float64)
    y = torch.randn(50, 1, generator=g, dtype=torch.float64)
    return model, x, y


def _mse(out, t):
    return ((out - t) ** 2).mean()


def test_minibatch_gradients_match_the_closed_form():
    d, b, n = 6, 8, 20
    model, x, y = _linear(d, 0)
    G = minibatch_gradients(model, _mse, x, y, b, n, torch.Generator().manual_seed(3))
    assert G.shape == (n, d + 1)
    g = torch.Generator().manual_seed(3)
    w, c = model.weight.detach().numpy()[0], float(model.bias.detach())
    X, Y = x.numpy(), y.numpy()[:, 0]
    for i in range(n):
        idx = torch.randperm(len(X), generator=g)[:b].numpy()
        r = X[idx] @ w + c - Y[idx]  # loss = mean r^2: d/dw = 2 X^T r / b, d/dc = 2 mean r
        want = np.concatenate([2 * X[idx].T @ r / b, [2 * r.mean()]])
        np.testing.assert_allclose(G[i], want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def test_minibatch_gradients_keep_only_the_mask():
    d, b, n = 6, 8, 5
    model, x, y = _linear(d, 1)
    mask = [torch.tensor([[1.0, 0, 1, 0, 0, 1]]), torch.zeros(1)]
    full = minibatch_gradients(model, _mse, x, y, b, n, torch.Generator().manual_seed(4))
    part = minibatch_gradients(model, _mse, x, y, b, n, torch.Generator().manual_seed(4), mask=mask)
    np.testing.assert_array_equal(part, full[:, [0, 2, 5]])


def test_notes_ratio_is_the_notes_formula():
    rng = np.random.default_rng(0)
    for n, P, shift in ((20, 30, 0.3), (20, 500, 0.05), (5, 3, 2.0)):
        G = rng.standard_normal((n, P)) + shift
        mu = G.mean(0)
        signal = float(mu @ mu)
        noise = float(G.var(0, ddof=1).sum())  # torch.var's default: unbiased
        c_notes = signal / noise
        c_ours = max((signal - noise / n) / noise, 0.0)
        r = notes_ratio(G, b=4)
        np.testing.assert_allclose(r["C_notes"], c_notes, rtol=RTOL)
        np.testing.assert_allclose(r["p_notes"], c_notes / (1 + c_notes), rtol=RTOL)
        np.testing.assert_allclose(r["C_ours"], c_ours, rtol=RTOL, atol=RTOL)
        np.testing.assert_allclose(r["p_ours"], c_ours / (1 + c_ours), rtol=RTOL, atol=RTOL)


def test_hill_alpha_notes_by_a_loop():
    rng = np.random.default_rng(1)
    x = rng.pareto(1.5, 5000) + 1.0  # tail index 1.5
    x = x * rng.choice([-1.0, 1.0], x.size)
    k = 100
    a = sorted((abs(v) for v in x), reverse=True)
    s = 0.0
    for i in range(k):
        s += np.log(a[i] / a[k])
    want = float(np.clip(k / s, 1.0, 2.0))
    np.testing.assert_allclose(hill_alpha_notes(x, k), want, rtol=RTOL)
    assert 1.2 < want < 1.8  # and it estimates the index (k = 100: se ≈ α/√k = 0.15)
    assert hill_alpha_notes(rng.standard_normal(5000), k) == 2.0  # light tail: at the notes' clip
    assert np.isnan(hill_alpha_notes(np.ones(50), k))  # too few values
