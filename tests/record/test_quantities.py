"""The recorder's quantities: the object form records the same run as the keyword form.

The keyword arguments (``grad_*``, ``curvature_*``, ``snapshot_*`` ...) are a compatibility layer
that builds :mod:`phasewatch.record.quantities` objects; a run recorded both ways must have the
same ``meta.json`` (but for its run id and start time) and bit-identical tables, since the same
code computes them on the same θ_t.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from phasewatch import Recorder
from phasewatch.errors import RecorderError
from phasewatch.record.control import CRuleLR
from phasewatch.record.quantities import Checkpoints, Controllers, Curvature, GradNoise, Quantity, Snapshots
from phasewatch.store.reader import open_run

STEPS = 24


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    return model, opt, x, y


def _per_example(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def _train(path, quantities=None, **kw):
    model, opt, x, y = _setup()
    probe = (x[:12], y[:12])
    if quantities is not None:
        quantities = quantities(opt, probe, x)
    else:
        kw = {k: (v(opt, probe, x) if callable(v) and k.startswith("_") else v) for k, v in kw.items()}
        kw = {k.lstrip("_"): v for k, v in kw.items()}
    with Recorder(path, model, opt, quantities=quantities, k=8, block=4, strict=True, seeds={"data": 1},
                  **kw) as rec:
        for t in range(STEPS):
            i = (8 * t) % 56
            loss = torch.nn.functional.cross_entropy(model(x[i: i + 8]), y[i: i + 8])
            opt.zero_grad()
            loss.backward()
            rec.loss(loss)
            opt.step()
    return open_run(path)


KW = dict(snapshot_every=5, snapshot_kind="raw", snapshot_dtype="float32", checkpoint_every=7,
          grad_samples_every=3, _grad_probe=lambda opt, probe, x: probe, grad_loss=_per_example,
          grad_samples_max=8, grad_proj_dim=5, grad_proj_seed=3,
          curvature_every=6, _curvature_batch=lambda opt, probe, x: probe,
          curvature_loss=torch.nn.functional.cross_entropy, curvature_topk=2, curvature_max_iter=20,
          curvature_trace=4, _ntk_inputs=lambda opt, probe, x: x[:5], ntk_method="jacobian",
          _controllers=lambda opt, probe, x: [CRuleLR(opt)], batch_size=8)


# (ntk_method pinned: "auto" chooses by timing, so two runs may differ in the NTK's float32 roundoff)


def _objects(opt, probe, x):  # the same run as KW, listed in a different order on purpose
    return [Controllers([CRuleLR(opt)], batch_size=8),
            Curvature(6, batch=probe, loss=torch.nn.functional.cross_entropy, topk=2, max_iter=20, trace=4,
                      ntk_inputs=x[:5], ntk_method="jacobian"),
            GradNoise(3, probe=probe, loss=_per_example, samples_max=8, proj_dim=5, proj_seed=3),
            Checkpoints(7), Snapshots(5, kind="raw", dtype="float32")]


def _meta(run_dir):
    meta = json.loads((run_dir / "meta.json").read_text())
    meta.pop("run_id")
    for s in meta["sessions"]:
        s.pop("started")
    return meta


def test_objects_record_the_same_run_as_keywords(tmp_path):
    a = _train(tmp_path / "kw", **KW)
    b = _train(tmp_path / "obj", quantities=_objects)
    assert _meta(tmp_path / "kw") == _meta(tmp_path / "obj")
    rec_meta = _meta(tmp_path / "kw")["recorder"]
    assert rec_meta["grad_samples_every"] == 3 and rec_meta["curvature_every"] == 6
    assert rec_meta["controllers"][0]["class"] == "CRuleLR" and rec_meta["batch_size"] == 8.0
    for name in ("band", "grad_samples", "grad_proj", "curvature", "ntk", "snapshots", "checkpoints"):
        ta, tb = a.table(name), b.table(name)
        assert len(ta["step"]) > 0, name
        for col in ta:
            if col in ("wall_time", "seconds", "wall"):
                continue
            np.testing.assert_array_equal(ta[col], tb[col], err_msg=f"{name}.{col}")
    assert a.table("grad_samples")["step"].tolist() == list(range(3, STEPS + 1, 3))
    assert a.table("curvature")["step"].tolist() == list(range(6, STEPS + 1, 6))
    np.testing.assert_array_equal(a.steps["loss"], b.steps["loss"])
    np.testing.assert_array_equal(a.steps["lr"], b.steps["lr"])


def test_a_kind_given_twice_is_refused(tmp_path):
    model, opt, x, y = _setup()
    with pytest.raises(RecorderError, match="both as an object and as keyword"):
        Recorder(tmp_path / "a", model, opt, quantities=[Checkpoints(3)], checkpoint_every=4)
    with pytest.raises(RecorderError, match="two Checkpoints"):
        Recorder(tmp_path / "b", model, opt, quantities=[Checkpoints(3), Checkpoints(4)])
    with pytest.raises(RecorderError, match="not a phasewatch Quantity"):
        Recorder(tmp_path / "c", model, opt, quantities=[object()])
    with pytest.raises(TypeError, match="Recorder\\(\\) got an unexpected keyword argument 'grad_every'"):
        Recorder(tmp_path / "d", model, opt, grad_every=3)


def test_each_quantity_checks_its_own_options():
    with pytest.raises(RecorderError, match="snapshot_kind"):
        Snapshots(3, kind="fold")
    with pytest.raises(RecorderError, match="grad_probe is given but grad_samples_every is not"):
        GradNoise(None, probe=(torch.zeros(2, 1), torch.zeros(2)))
    with pytest.raises(RecorderError, match="grad_samples_max"):
        GradNoise(3, samples_max=0)
    with pytest.raises(RecorderError, match="neither curvature_batch nor ntk_inputs"):
        Curvature(3)
    with pytest.raises(RecorderError, match="batch_size"):
        Controllers([], batch_size=0)
    assert GradNoise(3).should_compute(6) is False  # micro-batch samples are taken before the step
    assert Checkpoints("log").should_compute(10) and not Checkpoints("log").should_compute(11)


class _ParamNorm(Quantity):
    """A user quantity: the squared parameter norm every ``every`` steps, into the metrics table."""

    order = 50

    def config(self, rec):
        return {"what": "param_sq_norm"}

    def compute(self, rec, step):
        rec.log(step=step, param_sq_norm=sum(float((p.detach().double() ** 2).sum()) for p in rec.params))


def test_a_user_quantity_runs_on_its_schedule(tmp_path):
    run = _train(tmp_path / "u", quantities=lambda opt, probe, x: [_ParamNorm(every=5)])
    steps, values = run.metrics()["param_sq_norm"]
    assert steps.tolist() == [5, 10, 15, 20]
    model, opt, x, y = _setup()
    want = []
    for t in range(STEPS):  # the same steps without a recorder (the recorder does not touch the training)
        i = (8 * t) % 56
        loss = torch.nn.functional.cross_entropy(model(x[i: i + 8]), y[i: i + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (t + 1) % 5 == 0:
            want.append(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))
    np.testing.assert_array_equal(values, want)
    assert _meta(tmp_path / "u")["recorder"]["quantities"] == [
        {"class": "_ParamNorm", "every": 5, "what": "param_sq_norm"}]
