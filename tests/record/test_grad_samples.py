"""Gradient samples: the recorder's grad_samples table against closed-form gradients and numpy."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.analysis import noise
from phasewatch.errors import RecorderError
from phasewatch.record import recorder as recorder_mod
from phasewatch.record.probes import gram_statistics, per_example_gradients
from phasewatch.store.writer import RunWriter

STATS = ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third")
D = 5


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def _linreg(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1, bias=False).double()
    w_star = torch.randn(D, 1, dtype=torch.float64)
    return model, w_star


def _batch(n, w_star, gen):
    x = torch.randn(n, D, dtype=torch.float64, generator=gen)
    y = x @ w_star + 0.5 * torch.randn(n, 1, dtype=torch.float64, generator=gen)
    return x, y


def _per_example_loss(out, y):
    return 0.5 * ((out - y) ** 2).sum(dim=-1)


def _closed_form(w, x, y):
    """Per-example gradients of ½(xᵀw − y)²: x (xᵀw − y), as an (n, D) float64 array."""
    x, y, w = x.numpy(), y.numpy()[:, 0], w.reshape(-1)
    return x * (x @ w - y)[:, None]


def test_gram_statistics_equal_numpy_sufficient_statistics():
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (7,), (2, 2, 2)]
    n = 13
    parts = [rng.normal(0.3, 1.0, size=(n, *s)) for s in shapes]
    parts[1][5, 2] = np.nan  # a non-finite sample is dropped, as numpy drops it
    G = np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
    ref = noise.sufficient_statistics(G, b=1)
    st = gram_statistics([torch.from_numpy(p) for p in parts], [0, 1, 0], 2, n_max=16)
    assert st["n"] == ref.n == n - 1
    for k in STATS:
        assert _rel(st[k], getattr(ref, k)) < 1e-10, k
    # per-layer mean_sq_norm and trace add up to the global values
    assert _rel(st["layer_mean_sq_norm"].sum(), ref.mean_sq_norm) < 1e-12
    assert _rel(st["layer_trace"].sum(), ref.trace) < 1e-12
    norms = st["sample_norms"]
    assert np.isnan(norms[5]) and np.all(np.isnan(norms[n:]))
    ok = np.isfinite(G).all(axis=1)
    np.testing.assert_allclose(norms[:n][ok], np.linalg.norm(G[ok], axis=1), rtol=1e-12)


def test_per_example_route_matches_closed_form(tmp_path):
    model, w_star = _linreg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    px, py = _batch(37, w_star, gen)
    thetas = {}
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=2, strict=True,
                             grad_samples_every=2, grad_probe=(px, py), grad_loss=_per_example_loss,
                             grad_chunk=8, grad_samples_max=40) as rec:
        for step in range(1, 7):
            x, y = _batch(16, w_star, gen)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.loss(loss)
            opt.step()
            thetas[step] = model.weight.detach().clone()
    run = phasewatch.open_run(tmp_path / "r")
    t = run.table("grad_samples")
    assert t["step"].tolist() == [2, 4, 6]
    assert [s.decode() for s in t["source"]] == ["per_example"] * 3
    assert np.all(t["b"] == 1) and np.all(t["n"] == 37)
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["recorder"]["grad_samples_source"] \
        == "per_example"
    for row, step in enumerate(t["step"]):
        G = _closed_form(thetas[int(step)].numpy(), px, py)  # on the θ after the step
        ref = noise.sufficient_statistics(G, b=1)
        for k in STATS:
            assert _rel(t[k][row], getattr(ref, k)) < 1e-8, (step, k)
        np.testing.assert_allclose(t["sample_norms"][row, :37], np.linalg.norm(G, axis=1), rtol=1e-10)
        assert np.all(np.isnan(t["sample_norms"][row, 37:]))
        np.testing.assert_allclose(t["layer_trace"][row].sum(), t["trace"][row], rtol=1e-12)
        # the analyzer's call on the stored statistics gives what the raw samples give
        stored = noise.consolidation_ratio(n=int(t["n"][row]), b=float(t["b"][row]), ci="delta",
                                           **{k: float(t[k][row]) for k in STATS})
        raw = noise.consolidation_ratio(G, ci="delta")
        assert stored.ci_method == raw.ci_method == "delta"
        assert _rel(stored.C, raw.C) < 1e-8
        np.testing.assert_allclose(stored.ci, raw.ci, rtol=1e-7)


def _accumulate_train(rec, model, opt, w_star, gen, n_micro, m, steps, single=()):
    """Gradient accumulation, each micro-batch loss divided by n_micro; returns per step the θ the
    step started from and the micro-batches."""
    seen = {}
    for step in range(1, steps + 1):
        k = 1 if step in single else n_micro
        theta = model.weight.detach().clone()
        mbs = [_batch(m, w_star, gen) for _ in range(k)]
        for x, y in mbs:
            loss = 0.5 * ((model(x) - y) ** 2).sum(-1).mean() / k
            loss.backward()
            rec.loss(loss)
        opt.step()
        opt.zero_grad()
        seen[step] = (theta, mbs)
    return seen


def test_micro_batch_route_matches_grouped_per_example(tmp_path, caplog):
    model, w_star = _linreg(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    n_micro, m = 6, 8
    caplog.set_level(logging.DEBUG, logger="phasewatch")
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=2, strict=True,
                             grad_samples_every=[2, 3, 5], grad_microbatch_size=m) as rec:
        seen = _accumulate_train(rec, model, opt, w_star, gen, n_micro, m, 6, single={3})
    t = phasewatch.open_run(tmp_path / "r").table("grad_samples")
    assert t["step"].tolist() == [2, 5]  # step 3 had one backward pass: skipped
    assert "need >= 2" in caplog.text
    assert [s.decode() for s in t["source"]] == ["micro_batch"] * 2
    assert np.all(t["b"] == m) and np.all(t["n"] == n_micro)
    for row, step in enumerate(t["step"].tolist()):
        theta, mbs = seen[step]
        # the same examples, grouped: micro-batch means of the closed-form per-example gradients
        per_ex = [_closed_form(theta.numpy(), x, y) for x, y in mbs]
        means = np.stack([g.mean(axis=0) for g in per_ex])
        ref = noise.sufficient_statistics(means, b=m)
        for k in STATS:
            assert _rel(t[k][row], getattr(ref, k)) < 1e-8, (step, k)
        # and through the per-example route (torch.func) on the same θ, grouped the same way
        with torch.no_grad():
            w_now = model.weight.detach().clone()
            model.weight.copy_(theta)
        x_all = torch.cat([x for x, _ in mbs])
        y_all = torch.cat([y for _, y in mbs])
        (g,) = per_example_gradients(model, ["weight"], x_all, y_all, _per_example_loss, chunk=5)
        with torch.no_grad():
            model.weight.copy_(w_now)
        grouped = g.reshape(n_micro, m, -1).mean(dim=1)
        st = gram_statistics([grouped], [0], 1, 64)
        for k in STATS:
            assert _rel(t[k][row], st[k]) < 1e-8, (step, k)
        # ḡ is the mean of all examples: the same as the per-example route's on the whole batch
        full = gram_statistics([g], [0], 1, 64)
        assert _rel(t["mean_sq_norm"][row], full["mean_sq_norm"]) < 1e-10


def test_micro_batch_scale_one_stores_raw_differences(tmp_path):
    model, w_star = _linreg(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(6)
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=2, strict=True,
                             grad_samples_every=2, grad_microbatch_scale=1.0) as rec:
        seen = _accumulate_train(rec, model, opt, w_star, gen, 4, 8, 2)
    t = phasewatch.open_run(tmp_path / "r").table("grad_samples")
    assert np.isnan(t["b"][0])
    theta, mbs = seen[2]
    diffs = np.stack([_closed_form(theta.numpy(), x, y).mean(axis=0) / 4 for x, y in mbs])
    assert _rel(t["trace"][0], noise.sufficient_statistics(diffs).trace) < 1e-8


def test_batchnorm_in_training_mode_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with pytest.raises(RecorderError, match="BatchNorm in training mode") as ei:
        phasewatch.Recorder(tmp_path / "r", model, opt, grad_samples_every=1, grad_probe=(x, y),
                            grad_loss=_per_example_loss)
    assert "\n" not in str(ei.value) and "grad_probe_eval=True" in str(ei.value)
    # with grad_probe_eval=True the probe runs in eval mode; training mode and running stats stay
    with phasewatch.Recorder(tmp_path / "r2", model, opt, k=4, block=2, strict=True, grad_samples_every=1,
                             grad_probe=(x, y), grad_loss=_per_example_loss, grad_probe_eval=True) as rec:
        for _ in range(2):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            mean_before = model[1].running_mean.clone()
            opt.step()
            assert model.training and model[1].training
            assert torch.equal(model[1].running_mean, mean_before)
            rec.loss(loss)
    t = phasewatch.open_run(tmp_path / "r2").table("grad_samples")
    assert t["step"].tolist() == [1, 2] and np.all(t["n"] == 16)
    assert np.all(np.isfinite(t["trace"])) and t["layer_trace"].shape == (2, 6)  # 6 parameter tensors


def test_failure_inside_probe_disables_recorder_not_training(tmp_path, caplog):
    model, w_star = _linreg(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(8)
    px, py = _batch(10, w_star, gen)
    calls = []

    def bad_loss(out, y):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("probe exploded")
        return _per_example_loss(out, y)

    rec = phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=1, grad_samples_every=2,
                              grad_probe=(px, py), grad_loss=bad_loss)
    for _ in range(6):
        x, y = _batch(8, w_star, gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.loss(loss)
    rec.close()
    assert not rec.enabled and "probe exploded" in caplog.text
    assert "training continues" in caplog.text
    t = phasewatch.open_run(tmp_path / "r").table("grad_samples")
    assert t["step"].tolist() == [2]


def test_resume_of_a_run_recorded_without_the_table(tmp_path, monkeypatch):
    model, w_star = _linreg(9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(10)

    def old_writer(path, meta, tables, **kw):  # a run written before grad_samples existed
        return RunWriter(path, meta, [t for t in tables if t.name != "grad_samples"], **kw)

    def train(rec, n):
        for _ in range(n):
            x, y = _batch(8, w_star, gen)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.loss(loss)

    with monkeypatch.context() as mp:
        mp.setattr(recorder_mod, "RunWriter", old_writer)
        with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=1, strict=True) as rec:
            train(rec, 3)
    with pytest.raises(RecorderError, match="without a grad_samples table") as ei:
        phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=1, resume=True, grad_samples_every=1)
    assert "\n" not in str(ei.value)
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=1, strict=True, resume=True) as rec:
        train(rec, 2)
    run = phasewatch.open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [1, 2, 3, 4, 5]

    # a run with the table resumes with sampling; its n_max is kept
    with phasewatch.Recorder(tmp_path / "s", model, opt, k=4, block=1, strict=True, grad_samples_max=8,
                             grad_samples_every=1, grad_microbatch_scale=1.0) as rec:
        train(rec, 2)
    with phasewatch.Recorder(tmp_path / "s", model, opt, k=4, block=1, strict=True, resume=True,
                             grad_samples_every=1, grad_probe=_batch(12, w_star, gen),
                             grad_loss=_per_example_loss) as rec:
        assert rec.grad_samples_max == 8
        train(rec, 2)
    t = phasewatch.open_run(tmp_path / "s").table("grad_samples")
    assert t["step"].tolist() == [3, 4] and t["sample_norms"].shape == (2, 8)


def test_failure_inside_micro_batch_hook_never_breaks_backward(tmp_path, caplog):
    model, w_star = _linreg(11)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(12)
    rec = phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=1, grad_samples_every=[2, 3])
    seen = _accumulate_train(rec, model, opt, w_star, gen, 3, 4, 2)
    assert rec.enabled and rec._mb.armed  # armed for step 3
    rec._mb._snaps = None  # the hook now raises inside backward()
    before = model.weight.detach().clone()
    _accumulate_train(rec, model, opt, w_star, gen, 3, 4, 2)
    rec.close()
    assert not rec.enabled and "recorder disabled" in caplog.text
    assert not torch.equal(model.weight, before)  # training went on
    assert not model.weight._post_accumulate_grad_hooks  # hooks removed
    t = phasewatch.open_run(tmp_path / "r").table("grad_samples")
    assert t["step"].tolist() == [2] and len(seen) == 2
