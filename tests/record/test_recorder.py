"""The recorder on real small training runs, checked against brute force on the stored updates."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.analysis import adiabatic as adia
from phasewatch.analysis.gram import band_from_updates, window_singular_values
from phasewatch.record.projection import fold, fold_matrix, fold_signs


def _mlp(seed=0, hidden=24):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 4))


def _data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(rec, model, opt, steps, x, y, loss_after=False):
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if not loss_after:
            rec.loss(loss)
        opt.step()
        if loss_after:
            rec.loss(loss)


def test_band_equals_brute_force_of_raw_updates(tmp_path):
    """Spectra, k* and A from the band equal a brute-force SVD of the stored raw updates."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x, y = _data()
    W, K = 6, 8
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=K, block=5, snapshot_every=1,
                             checkpoint_every=1, strict=True) as rec:
        _train(rec, model, opt, 60, x, y)
    run = phasewatch.open_run(tmp_path / "r")
    U = run.table("snapshots")["update"]
    assert U.dtype == np.float64 and U.shape == (60, run.n_params)

    # the stored update is θ_t − θ_{t−1}: compare with the checkpoints (float32)
    theta = run.table("checkpoints")["theta"].astype(np.float64)
    np.testing.assert_allclose(U[1:], np.diff(theta, axis=0), atol=2e-7, rtol=0)

    band = run.band["band"]
    ref = band_from_updates(U, K)
    assert np.array_equal(np.isnan(band), np.isnan(ref))
    scale = np.nanmax(np.abs(ref))
    assert np.nanmax(np.abs(band - ref)) / scale < 1e-13
    # per-layer bands sum to the global band
    np.testing.assert_allclose(run.band["layer_band"].sum(axis=1), band, rtol=1e-13, atol=0)
    assert run.band["layer_band"].shape[1] == 4

    res = phasewatch.analyze(run, window=W)
    sig_ref, ends = window_singular_values(U, W)
    sig = res.table["sigma"]
    assert sig.shape == sig_ref.shape
    # every singular value above 1e-4·σ1 to 1e-8 relative; the rest to 1e-8 of σ1 (the Gram route's
    # accuracy for σ_j is ~ε·σ1²/σ_j, an inherent limit of forming X Xᵀ)
    well = sig_ref >= 1e-4 * sig_ref[:, :1]
    rel = np.abs(sig - sig_ref) / sig_ref
    assert np.max(rel[well]) < 1e-8
    assert np.max(np.abs(sig - sig_ref) / sig_ref[:, :1]) < 1e-8
    ratios = sig_ref[:, :-1] / sig_ref[:, 1:]
    assert np.array_equal(res.table["kstar"], np.argmax(ratios, axis=1) + 1)

    # canonical A against ‖C_t − C_{t−1}‖_F built explicitly from outer products
    A = res.table["A"]
    lr = run.band["lr"]
    checked = 0
    for n, r in enumerate(ends):
        if r < W:
            continue
        C_now = U[r - W + 1: r + 1].T @ U[r - W + 1: r + 1]
        C_prev = U[r - W: r].T @ U[r - W: r]
        k = int(np.argmax(ratios[n])) + 1
        g = sig_ref[n, k - 1] - sig_ref[n, k]
        a_ref = np.linalg.norm(C_now - C_prev) / (lr[r] * g * g)
        # A is as well conditioned as the gap g: δA/A ≈ 2δg/g with δg ~ ε·σ1²/σ_k*
        tol = 1e-8 if g > 1e-3 * sig_ref[n, 0] else 1e-5
        assert abs(A[n] - a_ref) / a_ref < tol
        checked += tol == 1e-8
    assert checked > (len(ends) - 1) // 2

    # the snapshot route gives the same table
    res2 = phasewatch.analyze(run, window=W, source="snapshots")
    assert np.array_equal(res2.table["kstar"], res.table["kstar"])
    np.testing.assert_allclose(res2.table["sigma"][well], sig[well], rtol=1e-8)


def test_projection_is_unbiased_and_within_stated_error(tmp_path):
    # the fold equals its dense matrix
    s = fold_signs(1000, seed=3, index=0, dtype=torch.float64, device=torch.device("cpu"))
    x = torch.randn(1000, dtype=torch.float64)
    np.testing.assert_allclose(fold(x, s, 64).numpy(), (fold_matrix(1000, 64, s) @ x).numpy(), rtol=1e-12)

    # same training recorded exact and projected: inner products agree within ~√(2/d)
    d = 256
    bands = {}
    for mode in ("exact", "projected"):
        model = _mlp(hidden=128)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        with phasewatch.Recorder(tmp_path / mode, model, opt, k=8, mode=mode, proj_dim=d, strict=True) as rec:
            _train(rec, model, opt, 40, x, y)
        run = phasewatch.open_run(tmp_path / mode)
        assert run.meta["recorder"]["mode"] == mode
        bands[mode] = run.band["layer_band"]
    assert run.meta["recorder"]["proj_dim"] == d and run.meta["recorder"]["proj_method"] == "sign-fold"
    assert run.meta["recorder"]["projected_tensors"] == ["0.weight", "2.weight"]
    ex, pr = bands["exact"], bands["projected"]
    # tensors with ≤ d elements are kept exact
    np.testing.assert_allclose(pr[:, [1, 3]], ex[:, [1, 3]], rtol=1e-10, equal_nan=True)
    # projected tensors: relative error of ‖u‖² within a few times √(2/d)
    for layer in (0, 2):
        rel = np.abs(pr[:, layer, 0] - ex[:, layer, 0]) / ex[:, layer, 0]
        assert np.median(rel) < 2 * math.sqrt(2 / d)
        assert np.max(rel) < 5 * math.sqrt(2 / d)


def test_raw_snapshots_in_projected_mode_are_the_raw_update(tmp_path):
    model = _mlp(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, stride=2, mode="projected", proj_dim=100,
                             snapshot_every=4, checkpoint_every=2, strict=True) as rec:
        _train(rec, model, opt, 16, x, y)
    run = phasewatch.open_run(tmp_path / "r")
    snap = run.table("snapshots")
    assert snap["step"].tolist() == [4, 8, 12, 16]
    theta = run.table("checkpoints")["theta"].astype(np.float64)  # steps 2, 4, ..., 16
    np.testing.assert_allclose(snap["update"], (theta[1::2] - theta[0::2]), atol=2e-7)


def test_auto_mode_switches_to_projection_above_budget(tmp_path, caplog):
    model = _mlp(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="phasewatch"):
        rec = phasewatch.Recorder(tmp_path / "r", model, opt, k=8, memory_budget=1000, proj_dim=128)
    rec.close()
    assert rec.mode == "projected"
    assert "projection" in caplog.text
    assert phasewatch.open_run(tmp_path / "r").meta["recorder"]["mode"] == "projected"


def test_accumulation_clipping_and_loss_conventions(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data(n=64)
    clip = 0.1
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, strict=True) as rec:
        for _ in range(10):
            opt.zero_grad()
            losses = []
            for xb, yb in zip(x.chunk(4), y.chunk(4)):  # 4 micro-batches, one optimizer step
                loss = torch.nn.functional.cross_entropy(model(xb), yb) / 4
                loss.backward()
                losses.append(loss.item())
                rec.loss(loss)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert total > clip  # clipping is active
            opt.step()
    run = phasewatch.open_run(tmp_path / "r")
    st = run.steps
    assert list(st["step"]) == list(range(1, 11))
    # the gradient the optimizer saw: after clipping
    np.testing.assert_allclose(st["grad_norm"], clip, rtol=1e-5)
    assert np.all(np.isfinite(st["loss"]))
    # layer gradient norms combine to the global one
    np.testing.assert_allclose(np.sqrt((st["layer_grad_norm"] ** 2).sum(1)), st["grad_norm"], rtol=1e-12)
    # update norm = lr × clipped gradient norm for plain SGD
    np.testing.assert_allclose(st["update_norm"], 0.05 * clip, rtol=1e-4)

    # losses given after optimizer.step() belong to the step just taken
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    given = []
    with phasewatch.Recorder(tmp_path / "after", model, opt, k=4, block=3, strict=True) as rec:
        for _ in range(7):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            rec.loss(loss)
            given.append(loss.item())
    st = phasewatch.open_run(tmp_path / "after").steps
    np.testing.assert_allclose(st["loss"], given, rtol=1e-6)
    # rows held back for their loss still get their update norm
    assert np.isfinite(st["update_norm"]).all()


def test_gradscaler_skipped_steps_are_not_steps(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _data()
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, strict=True) as rec:
        for i in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if i == 2:
                model[0].weight.grad[0, 0] = float("inf")  # overflow: the scaler skips this step
            rec.loss(loss) if i != 2 else None
            scaler.step(opt)
            scaler.update()
    run = phasewatch.open_run(tmp_path / "r")
    assert list(run.steps["step"]) == [1, 2, 3, 4, 5]
    assert np.all(np.isfinite(run.steps["grad_norm"]))  # unscaled gradients, never the inf
    assert np.all(run.steps["flags"] == 0)


def test_nonfinite_loss_and_gradients_are_flagged_not_fatal(tmp_path, caplog):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    with caplog.at_level(logging.WARNING, logger="phasewatch"):
        with phasewatch.Recorder(tmp_path / "r", model, opt, k=6, block=4) as rec:
            for i in range(30):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if i == 20:
                    model[2].bias.grad[0] = float("nan")
                    loss = loss * float("nan")
                rec.loss(loss)
                opt.step()
    run = phasewatch.open_run(tmp_path / "r")
    flags = run.steps["flags"]
    assert flags[20] & 1 and flags[20] & 2 and flags[20] & 4  # loss, gradient, update
    assert "non-finite" in caplog.text
    res = phasewatch.analyze(run, window=4)
    # every window after the NaN update contains it, directly or through the poisoned parameters
    assert res.table["valid"][res.table["step"] < 21].all()
    assert not res.table["valid"][res.table["step"] >= 21].any()
    assert any("non-finite" in w for w in res.warnings)


def test_recorder_failure_never_stops_training(tmp_path, caplog):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    rec = phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=2, flush_rows=4)
    with caplog.at_level(logging.ERROR, logger="phasewatch"):
        _train(rec, model, opt, 12, x, y)
        rec.writer.flush(rotate=False)
        rec.writer._file.close()  # the file goes away under the recorder (a real h5py failure)
        _train(rec, model, opt, 20, x, y)  # training goes on
    rec.close()
    assert not rec.enabled
    assert caplog.text.count("recorder disabled") == 1
    run = phasewatch.open_run(tmp_path / "r")
    assert list(run.steps["step"]) == list(range(1, 13))  # what was written survives

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = phasewatch.Recorder(tmp_path / "strict", model, opt, k=4, block=2, flush_rows=1, strict=True)
    rec.writer._file.close()
    with pytest.raises((RuntimeError, KeyError, ValueError, OSError)):  # h5py's own error, re-raised
        _train(rec, model, opt, 4, x, y)


def test_failing_recorder_keeps_later_optimizer_hooks_working(tmp_path, caplog):
    """A recorder that fails inside its step post-hook must not remove hooks while torch iterates
    them: a second recorder (or any later hook) on the same optimizer would make step() raise."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    first = phasewatch.Recorder(tmp_path / "a", model, opt, k=4, block=2, flush_rows=1)
    second = phasewatch.Recorder(tmp_path / "b", model, opt, k=4, block=2, flush_rows=1)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(1))
    with caplog.at_level(logging.ERROR, logger="phasewatch"):
        _train(first, model, opt, 3, x, y)
        first.writer._file.close()  # the first recorder's next write fails, inside its post-hook
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()  # must not raise
    first.close()
    second.close()
    assert not first.enabled and caplog.text.count("recorder disabled") == 1
    assert len(seen) == 8  # the user's hook after both recorders ran at every step
    assert list(phasewatch.open_run(tmp_path / "b").steps["step"]) == list(range(1, 9))


def test_stride_records_displacements(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    x, y = _data()
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, stride=3, checkpoint_every=3,
                             snapshot_every=3, strict=True) as rec:
        _train(rec, model, opt, 30, x, y)
    run = phasewatch.open_run(tmp_path / "r")
    assert list(run.band["step"]) == list(range(3, 31, 3))
    assert len(run.steps["step"]) == 30
    theta = run.table("checkpoints")["theta"].astype(np.float64)
    U = run.table("snapshots")["update"]
    np.testing.assert_allclose(U[1:], np.diff(theta, axis=0), atol=2e-7)
    np.testing.assert_allclose(run.band["band"][:, 0], (U**2).sum(1), rtol=1e-12)
    # update_norm is defined only at recorded displacements
    un = run.steps["update_norm"]
    assert np.isfinite(un[2::3]).all() and np.isnan(un[0::3]).all()


def test_resume_continues_steps_in_new_segment(tmp_path):
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, strict=True) as rec:
        _train(rec, model, opt, 10, x, y)
    with pytest.raises(phasewatch.RunFormatError):
        phasewatch.Recorder(tmp_path / "r", model, opt, k=4)
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, resume=True, strict=True) as rec:
        _train(rec, model, opt, 5, x, y)
        rec.log(test_acc=0.5)
    run = phasewatch.open_run(tmp_path / "r")
    assert list(run.steps["step"]) == list(range(1, 16))
    assert len(run.segments) == 2 and not run.warnings
    assert run.metrics()["test_acc"][0].tolist() == [15]
    # the band does not reach across the resume (the ring restarted): first rows of the session NaN
    b = run.band["band"]
    assert np.isnan(b[10, 1:]).all() and np.isfinite(b[9, :]).all()
    # resuming from an earlier checkpoint: overlap reported, later rows kept
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, resume=True, start_step=12, strict=True) as rec:
        _train(rec, model, opt, 2, x, y)
    run = phasewatch.open_run(tmp_path / "r")
    assert list(run.steps["step"]) == list(range(1, 15))
    assert any("overlap" in w for w in run.warnings)


def test_regime_labels_cover_codes():
    assert set(adia.REGIME_LABELS) == {-1, 0, 1, 2}
