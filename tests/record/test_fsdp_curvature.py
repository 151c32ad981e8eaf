"""Curvature probes under FSDP2 by shard-local finite-difference products: real 2-process gloo runs.

The 2-rank probe (every rank its shards, Lanczos vectors sharded like the parameters) against the
one-process FD probe on the same full batch and parameters, and against a dense float64 Hessian
(tiny tanh MLP, uneven Shard(0) splits); parameters bit-identical after the probe; a failing
forward on one rank raises on every rank without a hang.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from gloo_ranks import reports, run_ranks

from phasewatch.record import curvature as cv

BUILD = textwrap.dedent("""
    import torch

    def build():
        torch.manual_seed(0)
        # 7 and 3 rows: uneven Shard(0) splits on 2 ranks
        return torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()

    def record(path, rank=0, world=1, hvp="fd", fail_rank=None, steps=6):
        import phasewatch
        model = build()
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for m in model:
                if isinstance(m, torch.nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
        x, y = data()
        xb, yb = (x.chunk(world)[rank], y.chunk(world)[rank]) if world > 1 else (x, y)
        ce = torch.nn.functional.cross_entropy
        broken = [False]

        def loss(o, t):  # the probe's loss: on fail_rank it raises from the second probe on
            if broken[0]:
                raise ValueError("injected")
            return ce(o, t)

        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with phasewatch.Recorder(path, model, opt, k=4, block=2, strict=False, curvature_every=2,
                                 curvature_batch=(xb, yb), curvature_loss=loss, curvature_hvp=hvp,
                                 curvature_topk=2, curvature_trace=3) as rec:
            for t in range(steps):
                broken[0] = rank == fail_rank and t >= 2
                opt.zero_grad()
                out = ce(model(xb), yb)
                out.backward()
                rec.loss(out)
                opt.step()
        return model

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
""")

WORKER = BUILD + textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from phasewatch.record.curvature_fsdp import ShardedFDHessian, sharded_lanczos, sharded_trace

    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = data()
    xb, yb = x.chunk(world)[rank], y.chunk(world)[rank]  # each rank its half: the mean is the full batch's
    ce = torch.nn.functional.cross_entropy
    # a training step first, so p.grad holds training gradients the probe must leave alone
    ce(model(xb), yb).backward()
    before = [p.detach().to_local().clone() for p in model.parameters()]
    grads = [p.grad.to_local().clone() for p in model.parameters()]
    op = ShardedFDHessian(model, ce, (xb, yb), params=list(model.parameters()))
    r = sharded_lanczos(op, k=2, tol=1e-8)
    tr, tr_se = sharded_trace(op, samples=4, seed=5)
    z = [op.random_shard(seed=5 + 1 + i, kind="rademacher") for i in range(4)]
    same = all(torch.equal(p.detach().to_local(), b) for p, b in zip(model.parameters(), before))
    same_grad = all(torch.equal(p.grad.to_local(), g) for p, g in zip(model.parameters(), grads))
    full_z = []
    for zi in z:  # gather the Rademacher vectors: the one-process check uses the same ones
        parts, o = [], 0
        for p in model.parameters():
            k = p.to_local().numel()
            from torch.distributed.tensor import DTensor
            parts.append(DTensor.from_local(zi[o:o + k].view(p.to_local().shape), mesh, p.placements,
                                            shape=p.shape, stride=p.stride()).full_tensor().reshape(-1))
            o += k
        full_z.append(torch.cat(parts).tolist())
    theta = torch.cat([p.detach().full_tensor().reshape(-1) for p in model.parameters()]).tolist()

    def bad_loss(o, t):
        if rank == 1:
            raise ValueError("injected")
        return ce(o, t)

    failed = None
    try:
        sharded_lanczos(ShardedFDHessian(model, bad_loss, (xb, yb), params=list(model.parameters())), k=1)
    except RuntimeError as e:
        failed = str(e)
    same_after_fail = all(torch.equal(p.detach().to_local(), b) for p, b in zip(model.parameters(), before))
    record(f"{out}/rec" if rank == 0 else f"{out}/rec-rank{rank}", rank, world, hvp="auto")
    m = record(f"{out}/recfail" if rank == 0 else f"{out}/recfail-rank{rank}", rank, world, fail_rank=1, steps=8)
    import phasewatch
    errors = []
    for kw in ({"curvature_hvp": "autograd"}, {"curvature_groups": True}, {"curvature_trace": "adaptive"}):
        try:
            phasewatch.Recorder(f"{out}/err-{rank}", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                curvature_every=2, curvature_batch=(xb, yb), curvature_loss=ce, **kw)
            errors.append(None)
        except phasewatch.RecorderError as e:
            errors.append(str(e))
    finite = bool(all(torch.isfinite(p.full_tensor()).all() for p in m.parameters()))
    report = dict(errors=errors, finite=finite, eigenvalues=r.eigenvalues.tolist(), residuals=r.residuals.tolist(), converged=r.converged,
                  err=max(op.error_estimates), n=op.n, same=same, same_grad=same_grad, trace=tr, z=full_z,
                  theta=theta, loss=op.loss, failed=failed, same_after_fail=same_after_fail,
                  steps=op.steps[:3])
    with open(f"{out}/report-{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    sys.stdout.flush(); os._exit(0)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One pair of 2-rank workers for both tests: (their reports, their directory)."""
    out = tmp_path_factory.mktemp("fsdp_curv")
    return _run(out), out


def _run(tmp_path) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_ranks(script, tmp_path, timeout=150)
    return reports(tmp_path)


def test_fsdp_fd_probe_equals_one_process_and_dense_hessian(runs):
    """|λ_FSDP − λ| ≤ residual + 10·(the products' error estimates) against the dense float64
    Hessian (Weyl, as the one-process FD test), the same against the one-process FD probe, and the
    Hutchinson trace on the same Rademacher vectors equals Σ zᵀHz/s to the FD error; θ and the
    training gradients bit-identical after the probe; a forward failing on rank 1 raises on both."""
    reps = runs[0]
    r0, r1 = reps
    assert r0["eigenvalues"] == r1["eigenvalues"] and r0["trace"] == r1["trace"]  # every rank agrees
    assert r0["same"] and r1["same"] and r0["same_grad"] and r1["same_grad"]
    assert all("failed on 1 rank(s)" in r["failed"] for r in reps) and "injected" in r1["failed"]
    assert r0["same_after_fail"] and r1["same_after_fail"]
    ns: dict = {}
    exec(BUILD, ns)
    model = ns["build"]()
    x, y = ns["data"]()
    ce = torch.nn.functional.cross_entropy
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(theta, torch.tensor(r0["theta"], dtype=torch.float64))  # the same θ (full tensors)
    h = cv.HessianOperator(model, ce, (x, y)).dense()
    ev = np.linalg.eigvalsh(h)
    assert r0["n"] == h.shape[0]
    got = np.array(r0["eigenvalues"])
    e = 10 * r0["err"]
    for i, lam in enumerate((ev[-1], ev[-2])):
        assert abs(got[i] - lam) <= r0["residuals"][i] + e, (got, ev[-2:])
    fd = cv.FiniteDifferenceHessian(model, ce, (x, y))
    one = cv.lanczos(fd, fd.n, k=2, tol=1e-8)
    e1 = 10 * max(fd.error_estimates)
    assert np.all(np.abs(got - one.eigenvalues) <= np.array(r0["residuals"]) + one.residuals + e + e1)
    assert abs(r0["loss"] - float(ce(model(x), y).detach())) <= 64 * 2.0 ** -53 * abs(r0["loss"])
    zs = np.array(r0["z"])
    exact = float(np.mean([z @ h @ z for z in zs]))
    # each zᵀ(Hz) errs by ≤ ‖z‖·‖E z‖ ≤ ‖z‖²·E (E per unit vector, ‖z‖² = P)
    assert abs(r0["trace"] - exact) <= e * zs.shape[1] + 1e-12 * abs(exact), (r0["trace"], exact)


def test_fsdp_recorder_rows_equal_one_process(runs, tmp_path):
    """The recorder under FSDP2 (hvp='auto' picks FD) writes on rank 0 the rows the one-process
    recorder writes with hvp='fd' on the full batch: λ_1, λ_2 within both runs' residuals plus the
    FD products' accuracy (noise floor 100·u^{2/3} relative, each side), u_curvature (the exact
    update) likewise; a probe failing on rank 1 switches probes off on both ranks, no hang."""
    from phasewatch import open_run

    reps, out = runs
    assert reps[0]["finite"] and reps[1]["finite"]
    assert not (out / "rec-rank1").exists()  # ranks != 0 write nothing
    ns: dict = {}
    exec(BUILD, ns)
    ns["record"](tmp_path / "one")

    def rows(name):
        return open_run((tmp_path if name == "one" else out) / name).table("curvature")

    a, b = rows("rec"), rows("one")
    assert a["step"].tolist() == b["step"].tolist() == [2, 4, 6]
    assert a["hvp"].tolist() == [b"fd"] * 3
    assert open_run(out / "rec").meta["recorder"]["curvature"]["distributed"] == {"kind": "fsdp2", "world_size": 2}
    floor = 100 * (2.0 ** -53) ** (2 / 3)
    lam = np.abs(b["eigenvalues"]).max()
    assert np.all(np.abs(a["eigenvalues"] - b["eigenvalues"]) <= a["residuals"] + b["residuals"] + 2 * floor * lam)
    assert np.all(np.isfinite(a["u_curvature"]))
    assert np.all(np.abs(a["u_curvature"] - b["u_curvature"]) <= 2 * floor * lam), (a["u_curvature"], b["u_curvature"])
    assert np.all(a["trace_probes"] == 3) and np.all(np.isfinite(a["trace"]))
    c = rows("recfail")
    assert c["step"].tolist() == [2]  # the second probe failed on rank 1: off on both, training went on


def test_fsdp_curvature_refusals_are_one_clear_line(runs):
    """What the FSDP2 probe cannot do is refused with one line naming the fix."""
    errs = runs[0][0]["errors"]
    assert all(e is not None and "\n" not in e and "FSDP" in e for e in errs), errs
    assert "curvature_hvp='fd'" in errs[0] and "curvature_groups" in errs[1] and "an int" in errs[2]
