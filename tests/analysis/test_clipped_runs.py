"""Gradient clipping and the tail index, on real runs recorded with the real Recorder.

With ``clip_grad_norm_`` active, the recorded (post-clip) gradient norms pile up at the clip level
(float-rounded, so not exactly equal) and Hill reads 1e6-1e7 there.  DEFINITIONS §3: the Hill
kernel refuses such tails (NaN + the tied fraction + the likely cause), and the tail analysis uses
the norm before clipping where the run recorded it (``grad_norm_unclipped``).
"""

from __future__ import annotations

import json

import numpy as np
import torch

import phasewatch
from phasewatch.analysis import tails
from phasewatch.record import recorder as recorder_mod
from phasewatch.store import format as fmt
from phasewatch.store.writer import RunWriter

CLIP = 5.0  # binds at about 14% of the steps of this task


def _train(path, steps=400, *, unclipped=True, resume=False, seed=0, **kw):
    """A small MLP on a regression task with Student-t(1.5) label noise (heavy-tailed gradient
    norms), SGD, clip_grad_norm_ at CLIP.  Returns the norms clip_grad_norm_ returned."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 8, generator=g)
    y = X @ torch.randn(8, 1, generator=g) + 0.5 * torch.distributions.StudentT(1.5).sample((2048, 1))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre = []
    with phasewatch.Recorder(path, model, opt, k=4, strict=True, resume=resume, **kw) as rec:
        for _ in range(steps):
            idx = torch.randint(0, 2048, (32,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
            loss.backward()
            rec.loss(loss)
            n = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if unclipped:
                rec.unclipped_grad_norm(n)
            pre.append(float(n))
            opt.step()
    return np.array(pre)


def test_the_norm_before_clipping_is_recorded_and_used_by_the_tail_analysis(tmp_path):
    pre = _train(tmp_path / "r", block=7)
    run = phasewatch.open_run(tmp_path / "r")
    un, gn = run.steps["grad_norm_unclipped"], run.steps["grad_norm"]
    np.testing.assert_array_equal(un, pre)  # what clip_grad_norm_ returned, every step
    assert 0.05 < np.mean(pre > CLIP) < 0.5
    # the recorder's own norm is the clipped one: c·N/(N + 1e-6) where N > c (float32 recomputation)
    np.testing.assert_allclose(gn, np.where(pre > CLIP, CLIP * pre / (pre + 1e-6), pre), rtol=1e-5)
    a = phasewatch.analyze(run, window=4)
    ti = a.tail_index
    ref = tails.rolling_hill(pre, window=100, fraction=0.1)
    np.testing.assert_array_equal(ti["alpha"], ref.alpha)  # computed from the unclipped norms
    assert np.isfinite(ti["alpha"]).all() and not ti["alpha_degenerate"].any()
    assert "before clipping" in a.conventions["alpha"]


def test_clipped_norms_are_refused_with_the_reason(tmp_path):
    pre = _train(tmp_path / "r", unclipped=False)
    run = phasewatch.open_run(tmp_path / "r")
    gn = run.steps["grad_norm"]
    assert np.isnan(run.steps["grad_norm_unclipped"]).all()  # declared, never given
    # the whole sample: the top 10% is the clip atom
    h = tails.hill(gn, input_description="gradient norms over steps")
    assert h.degenerate and np.isnan(h.estimate)
    assert h.tied_fraction == np.mean(pre > CLIP) and f"gradient clipping at {CLIP:.3g}" in h.reason
    a = phasewatch.analyze(run, window=4)
    ti = a.tail_index
    n_clip = np.array([np.sum(pre[e - 99: e + 1] > CLIP) for e in range(99, len(pre))])
    assert (n_clip >= 11).any()
    deg = ti["alpha_degenerate"].astype(bool)
    assert deg[n_clip >= 11].all() and np.isnan(ti["alpha"][deg]).all()  # where the clip binds
    assert np.isfinite(tails.rolling_hill(pre).alpha).all()  # the same windows before clipping: no atom
    np.testing.assert_allclose(ti["alpha_tied_fraction"][deg], n_clip[deg] / 100)
    assert np.isnan(ti["C_levy"][n_clip >= 11]).all()
    assert any("windows refused" in w and "clipping" in w for w in a.warnings)
    assert "before clipping" not in a.conventions["alpha"]


def test_runs_without_the_column_are_read_and_resumed_without_it(tmp_path, monkeypatch):
    def old_writer(path, meta, tables, **kw):  # the steps table as recorded before the column existed
        return RunWriter(path, meta, [fmt.steps_table(t.columns["layer_grad_norm"].shape[0],
                                                      t.columns["lr"].shape[0]) if t.name == "steps" else t
                                      for t in tables], **kw)

    with monkeypatch.context() as mp:
        mp.setattr(recorder_mod, "RunWriter", old_writer)
        _train(tmp_path / "r", steps=60, unclipped=False)
    tables = json.loads((tmp_path / "r" / "meta.json").read_text())["tables"]
    assert "grad_norm_unclipped" not in tables["steps"]
    _train(tmp_path / "r", steps=60, resume=True, seed=1)  # values given, but the run has no column
    run = phasewatch.open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == list(range(1, 121)) and "grad_norm_unclipped" not in run.steps
    a = phasewatch.analyze(run, window=4)
    assert a.tail_index["alpha"].size == 21 and "before clipping" not in a.conventions["alpha"]
