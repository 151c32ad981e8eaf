"""Faults inside the recorder's own work, in process on a small real model: a gradient-sample
probe that raises, and NaN/Inf storms (a loss that is inf for a while, then gradients that blow
the parameters up until training restores them from a saved state).  Training never stops; the
probe's failure disables the recorder after writing every step it had computed; a storm is
flagged, never fatal, and the band recovers exactly (checked against the raw stored updates)."""

from __future__ import annotations

import logging

import numpy as np
import torch

import phasewatch
from phasewatch.analysis.gram import band_from_updates
from phasewatch.store import format as fmt

K = 6


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(48, 8), torch.randn(48, 3)
    return model, x, y


def _per_example_mse(out, tgt):
    return ((out - tgt) ** 2).mean(dim=-1)


def test_probe_exception_disables_recorder_keeps_every_computed_step_then_resumes(tmp_path, caplog):
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    broken = {"now": False}

    def loss_fn(out, tgt):
        if broken["now"]:
            raise RuntimeError("probe exploded")
        return _per_example_mse(out, tgt)

    path = tmp_path / "run"
    losses = []
    with caplog.at_level(logging.WARNING, logger="phasewatch"):
        rec = phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, flush_seconds=1e9,
                                  grad_samples_every=5, grad_probe=(x[:6], y[:6]), grad_loss=loss_fn)
        for step in range(1, 41):
            broken["now"] = step >= 25  # the probe runs every 5 steps: it fails at 25
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.loss(loss)  # before the step: every step row has its loss
            opt.step()
            losses.append(loss.item())
    rec.close()
    assert not rec.enabled and len(losses) == 40  # training went on to the end
    disabled = [r for r in caplog.records if "recorder disabled" in r.getMessage()]
    assert len(disabled) == 1 and "probe exploded" in disabled[0].getMessage()

    run = phasewatch.open_run(path)
    assert run.warnings == []
    # steps 1..25 all survive: the rows computed since the last flush were written on failure
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 26))
    np.testing.assert_array_equal(run.steps["loss"], losses[:25])
    np.testing.assert_array_equal(run.band["step"], np.arange(1, 26))
    np.testing.assert_array_equal(run.table("grad_samples")["step"], [5, 10, 15, 20])
    assert (run.table("grad_samples")["n"] == 6).all()

    # resumed with a working probe, where training is
    broken["now"] = False
    with phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, resume=True, start_step=40,
                             grad_samples_every=5, grad_probe=(x[:6], y[:6]), grad_loss=loss_fn,
                             strict=True) as rec:
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.loss(loss)
            opt.step()
    run = phasewatch.open_run(path)
    np.testing.assert_array_equal(run.steps["step"], np.r_[1:26, 41:51])
    assert [w for w in run.warnings if "15 steps are not recorded" in w]
    np.testing.assert_array_equal(run.table("grad_samples")["step"], [5, 10, 15, 20, 45, 50])


def test_nan_and_inf_storms_are_flagged_never_fatal_and_the_band_recovers(tmp_path, caplog):
    model, x, y = _setup(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "run"
    saved = {}
    with caplog.at_level(logging.WARNING, logger="phasewatch"):
        rec = phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, snapshot_every=1,
                                  strict=True)  # strict: any recorder error would fail the test
        for step in range(1, 61):
            if step == 31:  # training notices and restores the parameters saved at step 20
                model.load_state_dict(saved)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if 11 <= step <= 15:  # an inf storm in the reported loss only
                rec.loss(loss * float("inf"))
            else:
                rec.loss(loss)
            if 21 <= step <= 30:  # gradients blow up: NaN in one tensor, inf in another
                model[0].weight.grad.fill_(float("nan"))
                model[2].bias.grad.fill_(float("inf"))
            opt.step()
            if step == 20:
                saved.update({k: v.clone() for k, v in model.state_dict().items()})
        rec.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 1  # said once

    run = phasewatch.open_run(path)
    assert run.warnings == []
    st, flags = run.steps["step"], run.steps["flags"]
    np.testing.assert_array_equal(st, np.arange(1, 61))
    want = np.zeros(60, dtype="i4")
    want[10:15] = fmt.FLAG_LOSS_NONFINITE
    want[20] = fmt.FLAG_GRAD_NONFINITE | fmt.FLAG_UPDATE_NONFINITE  # loss still finite at 21
    want[21:30] = fmt.FLAG_LOSS_NONFINITE | fmt.FLAG_GRAD_NONFINITE | fmt.FLAG_UPDATE_NONFINITE
    want[30] = fmt.FLAG_UPDATE_NONFINITE  # θ31 − θ30 with θ30 NaN; loss and gradient finite again
    np.testing.assert_array_equal(flags, want)

    # the band equals brute force on the stored raw updates, NaN exactly where a lag reaches a
    # non-finite update, and finite again K-1 steps after the storm
    U = run.table("snapshots")["update"]
    assert U.shape == (60, run.n_params)
    bad_u = ~np.isfinite(U).all(axis=1)
    np.testing.assert_array_equal(np.nonzero(bad_u)[0] + 1, np.arange(21, 32))
    ref = band_from_updates(np.where(np.isfinite(U), U, np.nan), K)
    band = run.band["band"]
    assert np.array_equal(np.isnan(band), np.isnan(ref))
    ok = np.isfinite(ref)
    np.testing.assert_allclose(band[ok], ref[ok], rtol=1e-10, atol=1e-14 * np.abs(ref[ok]).max())
    assert np.isfinite(band[31 + K - 1:]).all() and np.isnan(band[31: 31 + K - 1, -1]).all()
    np.testing.assert_allclose(run.steps["update_norm"][~bad_u], np.sqrt(band[~bad_u, 0]), rtol=1e-12)

    # the analysis skips the poisoned windows and keeps the rest
    res = phasewatch.analyze(run, window=4)
    valid = dict(zip(res.table["step"].tolist(), res.table["valid"].tolist()))
    assert not any(valid.get(s, False) for s in range(21, 35))
    assert valid[60] and valid[15]

    # and the run resumes after the storm
    with phasewatch.Recorder(path, model, opt, k=K, block=4, flush_rows=8, snapshot_every=1, resume=True,
                             strict=True) as rec:
        for _ in range(10):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.loss(loss)
            opt.step()
    run = phasewatch.open_run(path)
    assert run.warnings == []
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 71))
    assert (run.steps["flags"][60:] == 0).all() and np.isfinite(run.band["band"][60, 0])
