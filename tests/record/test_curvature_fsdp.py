"""Curvature probes under FSDP2 with UNEQUAL shares of the probe batch (19 and 11 examples).

Real 2-process gloo runs on CPU (float64 model, uneven Shard(0) splits), checked against a
one-process dense float64 Hessian of the same model on the whole probe batch; parameters and p.grad
bit-identical after a probe; a probe failure on rank 1 switches the probes off on both ranks.
(tests/record/test_fsdp_curvature.py covers equal shares against the one-process recorder.)
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from gloo_ranks import reports, run_ranks

from phasewatch import curvature as cv
from phasewatch import open_run

COMMON = textwrap.dedent("""
    import torch

    def build():
        torch.manual_seed(0)
        # 20, 13 and 3 rows: uneven Shard(0) splits on 2 ranks
        return torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 13), torch.nn.Tanh(),
                                   torch.nn.Linear(13, 3)).double()

    def data(steps=16):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(steps, 32, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (steps, 32), generator=g)
        px = torch.randn(30, 6, generator=g, dtype=torch.float64)
        py = torch.randint(0, 3, (30,), generator=g)
        return x, y, px, py

    SPLIT = (19, 11)  # the ranks' (unequal) shares of the 30 probe examples
""")

WORKER = COMMON + textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import phasewatch
    from phasewatch.record.curvature_fsdp import ShardedFDHessian, sharded_lanczos

    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))

    def shard(model):
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    ce = torch.nn.functional.cross_entropy
    x, y, px, py = data()
    lo = sum(SPLIT[:rank])
    share = (px[lo: lo + SPLIT[rank]], py[lo: lo + SPLIT[rank]])
    report = {}

    # 1. the operator and Lanczos directly, at θ_0; p.grad set (one backward) and, second, None
    model = shard(build())
    ce(model(x[0].chunk(world)[rank]), y[0].chunk(world)[rank]).backward()
    params = list(model.parameters())
    for with_grad in (True, False):
        if not with_grad:
            for p in params:
                p.grad = None
        grads = [p.grad for p in params]
        gvals = [None if g is None else g.to_local().clone() for g in grads]
        theta = [p.to_local().clone() for p in params]
        op = ShardedFDHessian(model, ce, share, params=params)
        r = sharded_lanczos(op, 3, tol=1e-8)
        report[f"same_{with_grad}"] = bool(
            all(torch.equal(p.to_local(), t) for p, t in zip(params, theta))
            and all(p.grad is g for p, g in zip(params, grads))
            and all(g is None or torch.equal(g.to_local(), v) for g, v in zip(grads, gvals)))
    report.update(vals=r.eigenvalues.tolist(), res=r.residuals.tolist(), err=max(op.error_estimates),
                  loss=op.loss, n_matvec=r.n_matvec, converged=r.converged, steps=op.steps)
    full = [p.detach().full_tensor().numpy() for p in params]
    if rank == 0:
        np.savez(f"{out}/theta0.npz", *full)

    # 2. the recorder: probes at steps 5 and 10 while training (rank 0 writes)
    now = {"t": 0}

    def train(path, loss_fn, steps=12, **kw):
        model = shard(build())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        thetas = {}
        with phasewatch.Recorder(path, model, opt, k=4, block=3, curvature_every=5, curvature_batch=share,
                                 curvature_loss=loss_fn, curvature_topk=2, curvature_tol=1e-8, **kw) as rec:
            for t in range(steps):
                opt.zero_grad()
                loss = ce(model(x[t].chunk(world)[rank]), y[t].chunk(world)[rank])
                loss.backward()
                rec.loss(loss)
                now["t"] = t
                opt.step()
                if (t + 1) % 5 == 0:
                    thetas[t + 1] = [p.detach().full_tensor().numpy() for p in model.parameters()]
                    thetas[-t - 1] = [opt.state[p]["exp_avg_sq"].full_tensor().numpy() for p in model.parameters()]
            probe_on = rec._curvq.probe is not None
        finite = bool(all(torch.isfinite(p.full_tensor()).all() for p in model.parameters()))
        return thetas, probe_on, finite

    thetas, report["probe_on"], _ = train(f"{out}/run" if rank == 0 else f"{out}/run-rank{rank}", ce)
    if rank == 0:
        np.savez(f"{out}/thetas.npz", **{f"s{s}_{i}": a for s, th in thetas.items() for i, a in enumerate(th)})

    # 3. a probe loss that raises on rank 1 at the second probe: probes off on both ranks, both finish
    now = {"t": 0}

    def flaky(out_, tgt):  # (the probe runs inside opt.step() of step t + 1)
        if rank == 1 and now["t"] + 1 == 10:
            raise ValueError("injected failure on rank 1")
        return ce(out_, tgt)

    _, report["fail_probe_on"], report["fail_finite"] = train(
        f"{out}/fail" if rank == 0 else f"{out}/fail-rank{rank}", flaky, steps=16, strict=False)

    # 4. autograd HVPs, the trace and per-group curvature are refused with one line each
    report["refused"] = []
    for kw in ({"curvature_hvp": "autograd"}, {"curvature_trace": "adaptive"}, {"curvature_groups": True}):
        try:
            m = shard(build())
            phasewatch.Recorder(f"{out}/err-{rank}", m, torch.optim.SGD(m.parameters(), lr=0.1), curvature_every=5,
                                curvature_batch=share, curvature_loss=ce, **kw)
            report["refused"].append(None)
        except phasewatch.RecorderError as e:
            report["refused"].append(str(e))
    with open(f"{out}/report-{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    sys.stdout.flush(); os._exit(0)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("curv_fsdp")
    script = out / "worker.py"
    script.write_text(WORKER)
    errs = run_ranks(script, out, timeout=240)
    return out, reports(out), errs


def _dense(theta: list[np.ndarray], pre: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The dense float64 Hessian's eigenvalues (ascending) and loss of the whole probe batch at θ
    (``pre``: of D^{-1/2} H D^{-1/2} for the flat diagonal D)."""
    ns: dict = {}
    exec(COMMON, ns)
    m = ns["build"]()
    with torch.no_grad():
        for p, a in zip(m.parameters(), theta):
            p.copy_(torch.from_numpy(a))
    _, _, px, py = ns["data"]()
    op = cv.HessianOperator(m, torch.nn.functional.cross_entropy, (px, py))
    h = op.dense()
    if pre is not None:
        h = h / np.sqrt(np.outer(pre, pre))
    return np.linalg.eigvalsh(h), op.loss


def test_fsdp_fd_lanczos_equals_dense_hessian_of_the_whole_batch(runs):
    """λ_1..3 of the sharded FD probe vs the dense Hessian: |θ_i − λ_i| ≤ r_i + E with r_i the
    residual measured with sharded FD products and E = 10× the largest per-product error estimate
    (truncation ε²‖Hv̂‖/(6ℓ²) + rounding u‖θ‖‖Hv̂‖/ε, FiniteDifferenceHessian); in float64 that is
    ~u^{2/3} ≈ 4e-11 relative at the best step, so also ≤ 1e-8·λ_max."""
    out, reports, _ = runs
    r0, r1 = reports
    assert r0["vals"] == r1["vals"] and r0["res"] == r1["res"] and r0["steps"] == r1["steps"]  # same on both ranks
    theta = [np.load(out / "theta0.npz")[f"arr_{i}"] for i in range(6)]
    ev, loss = _dense(theta)
    top = ev[::-1][:3]
    vals, res = np.array(r0["vals"]), np.array(r0["res"])
    e = 10 * max(r0["err"], r1["err"])
    assert r0["converged"]
    assert np.all(np.abs(vals - top) <= res + e), (vals, top, res, e)
    assert np.all(np.abs(vals - top) <= 1e-8 * top[0]), np.abs(vals - top) / top[0]
    assert r0["loss"] == pytest.approx(loss, rel=1e-13)


def test_fsdp_probe_restores_parameters_and_grads_bit_exactly(runs):
    _, reports, _ = runs
    for r in reports:
        assert r["same_True"] and r["same_False"]


def test_fsdp_recorder_rows_equal_dense_hessian_at_the_probe_steps(runs):
    out, reports, _ = runs
    assert reports[0]["probe_on"] and reports[1]["probe_on"]
    assert not (out / "run-rank1").exists()
    th = np.load(out / "thetas.npz")
    c = open_run(out / "run").table("curvature")
    steps, vals, res = np.asarray(c["step"]), np.asarray(c["eigenvalues"]), np.asarray(c["residuals"])
    hvp, pre = np.asarray(c["hvp"]), np.asarray(c["pre_lambda"])
    assert steps.tolist() == [5, 10]
    assert all(h == b"fd" for h in hvp) and np.isfinite(pre).all()  # AdamW: the preconditioned sharpness too
    for i, s in enumerate(steps):
        ev, _ = _dense([th[f"s{s}_{j}"] for j in range(6)])
        top = ev[::-1][:2]
        assert np.all(np.abs(vals[i] - top) <= 1e-8 * top[0]), (vals[i], top)
        assert np.all(res[i] <= 1e-6 * top[0])
        # AdamW (β₂ = 0.999, ε = 1e-8) after s steps: D = √(v/(1 − β₂ˢ)) + ε
        v = np.concatenate([th[f"s{-s}_{j}"].ravel() for j in range(6)])
        pev, _ = _dense([th[f"s{s}_{j}"] for j in range(6)], np.sqrt(v / (1 - 0.999 ** s)) + 1e-8)
        assert abs(pre[i] - pev[-1]) <= 1e-8 * pev[-1], (pre[i], pev[-1])


def test_fsdp_probe_failure_on_one_rank_switches_probes_off_on_both(runs):
    out, reports, errs = runs
    assert not reports[0]["fail_probe_on"] and not reports[1]["fail_probe_on"]
    assert reports[0]["fail_finite"] and reports[1]["fail_finite"]
    assert "failed on 1 rank" in errs[0] and "curvature probes are off" in errs[0]
    assert "injected failure on rank 1" in errs[1] and "curvature probes are off" in errs[1]
    run = open_run(out / "fail")
    assert np.asarray(run.table("curvature")["step"]).tolist() == [5]  # the second probe failed
    assert int(np.asarray(run.table("steps")["step"])[-1]) == 16  # training and recording went on


def test_fsdp_autograd_hvps_trace_and_groups_are_refused_in_one_line(runs):
    _, reports, _ = runs
    for r in reports:
        autograd, trace, groups = r["refused"]
        assert "curvature_hvp='fd'" in autograd and trace.startswith("curvature_trace='adaptive' is not supported")
        assert groups.startswith("curvature_groups is not supported")
        assert all("\n" not in e for e in r["refused"])
