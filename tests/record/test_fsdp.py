"""FSDP2 (fully_shard, DTensor Shard(0) parameters): real 2-process gloo runs on CPU.

Every rank records its shards; one all-reduce per block gives the full-tensor band, gradient norms and
update norms; rank 0 writes.  Checked against the same model, data and seed trained on one process
without FSDP (float64: to 1e-10; float32: within the bound the two trajectories' measured
differences give, the trajectories themselves differing by float32 rounding of the gradient
reduction), and against brute force on the FSDP run's own gathered parameters (float32: to 1e-12).
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
from gloo_ranks import reports, run_ranks

import phasewatch

# the training shared by the FSDP workers and the single-process reference (exec'd in both)
TRAIN = textwrap.dedent("""
    import torch
    import phasewatch

    CONFIGS = {
        "sgd64": dict(optim="sgd", dtype="float64", rec=dict(snapshot_every=list(range(21, 31)), checkpoint_every=7)),
        "adamw64": dict(optim="adamw", dtype="float64", loss_after=True,
                        rec=dict(groups={"hidden": ["0", "2"], "out": ["4"]}, block=3)),
        "proj64": dict(optim="sgd", dtype="float64",
                       rec=dict(mode="projected", proj_dim=16, stride=2, snapshot_every=6, snapshot_kind="projected")),
        "adamw32": dict(optim="adamw", dtype="float32", brute=True, rec=dict(snapshot_every=10)),
        # gradient accumulation: 3 backward passes per step (global micro-batch: 8 examples, 4 per rank)
        "mb64": dict(optim="sgd", dtype="float64", accum=3, steps=10,
                     rec=dict(grad_samples_every=2, grad_microbatch_size=4, grad_samples_max=4,
                              groups={"hidden": ["0", "2"], "out": ["4"]})),
    }

    def build(dtype):
        torch.manual_seed(0)
        # 20, 13 and 3 rows: uneven Shard(0) splits on 2 ranks (13 -> 7 + 6, 3 -> 2 + 1)
        return torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 13), torch.nn.Tanh(),
                                   torch.nn.Linear(13, 3)).to(dtype)

    def shard(model, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def train(path, name, rank=0, world=1, steps=30, fail_at=None, strict=True):
        cfg = CONFIGS.get(name, CONFIGS["sgd64"])
        steps = cfg.get("steps", steps)
        dtype = getattr(torch, cfg["dtype"])
        model = build(dtype)
        if world > 1:
            shard(model, world)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(steps, 32, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (steps, 32), generator=g)
        if cfg["optim"] == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        kw = dict(k=6, block=4, strict=strict)
        kw.update(cfg["rec"])
        full = []
        with phasewatch.Recorder(path, model, opt, **kw) as rec:
            for t in range(steps):
                if fail_at is not None and t == fail_at:
                    rec._slot_views = None  # fault injection: this rank's next update fails
                xb, yb = x[t], y[t]
                opt.zero_grad()
                if cfg.get("accum"):  # micro-batch j: examples 8j..8j+7, split between the ranks
                    m = cfg["accum"]
                    if world == 1 and rec.grad_samples(t + 1):  # ground truth: each full micro-batch gradient
                        full.append([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                            torch.nn.functional.cross_entropy(model(xb[8 * j: 8 * j + 8]), yb[8 * j: 8 * j + 8]),
                            list(model.parameters()))]).numpy() for j in range(m)])
                    for j in range(m):
                        xj, yj = xb[8 * j: 8 * j + 8], yb[8 * j: 8 * j + 8]
                        if world > 1:
                            xj, yj = xj.chunk(world)[rank], yj.chunk(world)[rank]
                        loss = torch.nn.functional.cross_entropy(model(xj), yj) / m
                        loss.backward()
                    rec.loss(loss)
                    opt.step()
                    continue
                if world > 1:  # each rank its half of the batch: the mean gradient is the full batch's
                    xb, yb = xb.chunk(world)[rank], yb.chunk(world)[rank]
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                if cfg.get("brute"):  # ground truth: the full gradients (gathered) this step uses
                    grads = [p.grad.full_tensor() if world > 1 else p.grad.clone() for p in model.parameters()]
                if not cfg.get("loss_after"):
                    rec.loss(loss)
                opt.step()
                if cfg.get("loss_after"):
                    rec.loss(loss)
                if cfg.get("brute"):
                    theta = [p.detach().full_tensor() if world > 1 else p.detach().clone() for p in model.parameters()]
                    full.append(([t.numpy() for t in theta], [gr.numpy() for gr in grads]))
        return model, full

    def save_brute(path, full):  # the per-step parameters and gradients of a brute run, as plain arrays
        import numpy as np
        np.savez(path, **{f"theta{t}_{i}": a for t, (th, _) in enumerate(full) for i, a in enumerate(th)},
                 **{f"grad{t}_{i}": a for t, (_, gr) in enumerate(full) for i, a in enumerate(gr)})
""")

WORKER = TRAIN + textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch.distributed as dist

    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = {"all_reduce": 0, "gather": 0}
    for fn in calls:  # count the recorder's collectives (FSDP itself all-gathers and reduce-scatters)
        def counting(*a, _f=getattr(dist, fn), _n=fn, **k):
            calls[_n] += 1
            return _f(*a, **k)
        setattr(dist, fn, counting)
    report = {}
    for name in ("sgd64", "adamw64", "proj64", "adamw32", "mb64"):
        before = dict(calls)
        path = f"{out}/{name}" if rank == 0 else f"{out}/{name}-rank{rank}"  # rank 1 must write nothing
        _, full = train(path, name, rank, world)
        report[name] = {k: calls[k] - before[k] for k in calls}
        if rank == 0 and full:
            save_brute(f"{out}/{name}-brute.npz", full)
    # failure policy: one rank's recorder fails at step 11; every rank stops at the next all-reduce
    for bad in (0, 1):
        path = f"{out}/fail{bad}" if rank == 0 else f"{out}/fail{bad}-rank{rank}"
        model, _ = train(path, "sgd64", rank, world, fail_at=10 if rank == bad else None, strict=False)
        report[f"fail{bad}"] = bool(all(torch.isfinite(p.full_tensor()).all() for p in model.parameters()))
    # ... also when the next collective is a micro-batch sample all-reduce (rank 1 fails at step 5)
    before = dict(calls)
    path = f"{out}/failmb" if rank == 0 else f"{out}/failmb-rank{rank}"
    model, _ = train(path, "mb64", rank, world, fail_at=4 if rank == 1 else None, strict=False)
    report["failmb"] = [calls[k] - before[k] for k in calls]
    # errors: a partly sharded model, a placement FSDP2 does not make, an unsupported option
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor
    errors = []
    mesh = init_device_mesh("cpu", (world,))
    m1 = build(torch.float64)
    fully_shard(m1[0], mesh=mesh)
    m2 = torch.nn.Linear(3, 2)
    for n in ("weight", "bias"):
        setattr(m2, n, torch.nn.Parameter(distribute_tensor(getattr(m2, n).detach(), mesh, [Replicate()])))
    m3 = shard(build(torch.float64), world)
    probe = (torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    for model, kw in ((m1, {}), (m2, {}), (m3, {"grad_samples_every": 5, "grad_source": "per_rank"}),
                      (m3, {"grad_samples_every": 5, "grad_probe": probe, "grad_loss": lambda o, y: o.sum()})):
        try:
            phasewatch.Recorder(f"{out}/err-{rank}", model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)
            errors.append(None)
        except phasewatch.RecorderError as e:
            errors.append(str(e))
    report["errors"] = errors
    with open(f"{out}/report-{rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort it (std::terminate, exit -6)
    sys.stdout.flush(); os._exit(0)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank FSDP runs (one pair of worker processes) and their single-process references."""
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(WORKER)
    errs = run_ranks(script, out, timeout=150)
    import torch

    ns: dict = {}
    exec(TRAIN, ns)  # the same model, data and seed on this one process, no FSDP
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    try:
        for name in ("sgd64", "adamw64", "proj64"):
            ns["train"](out / f"{name}-single", name)
        _, full32 = ns["train"](out / "adamw32-single", "adamw32")
        ns["save_brute"](out / "adamw32-single-brute.npz", full32)
        _, mb_brute = ns["train"](out / "mb64-single", "mb64")
    finally:
        torch.set_num_threads(threads)
    np.save(out / "mb64-brute.npy", np.array(mb_brute))  # (rows, n, P): full micro-batch gradients
    return out, reports(out), errs


def _scale(band: np.ndarray) -> np.ndarray:
    """‖u_t‖·‖u_{t−j}‖ for each band entry (T, K): the Cauchy–Schwarz bound of |b_t[j]|."""
    n = np.sqrt(band[:, 0])
    T, K = band.shape
    prev = np.full((T, K), np.nan)
    for j in range(K):
        prev[j:, j] = n[: T - j]
    return n[:, None] * prev


def _compare(a, b, rtol: float, layer_rtol: float | None = None) -> None:
    ba, bb = a.band["band"], b.band["band"]
    assert a.band["step"].tolist() == b.band["step"].tolist()
    assert np.array_equal(np.isnan(ba), np.isnan(bb))
    np.testing.assert_allclose(ba[:, 0], bb[:, 0], rtol=rtol)  # ‖u_t‖²
    # every entry, relative to its Cauchy–Schwarz scale (off-diagonal entries may be near 0)
    assert np.nanmax(np.abs(ba - bb) / _scale(bb)) < rtol
    la, lb = a.band["layer_band"], b.band["layer_band"]
    for g in range(la.shape[1]):
        assert np.nanmax(np.abs(la[:, g] - lb[:, g]) / _scale(lb[:, g])) < (layer_rtol or rtol)
    np.testing.assert_allclose(la.sum(axis=1), ba, rtol=1e-12, atol=1e-15 * np.nanmax(ba))
    assert a.steps["step"].tolist() == b.steps["step"].tolist() == list(range(1, 31))
    for col in ("grad_norm", "layer_grad_norm", "update_norm"):
        x, y = a.steps[col], b.steps[col]
        assert np.array_equal(np.isnan(x), np.isnan(y)), col
        np.testing.assert_allclose(x, y, rtol=rtol, err_msg=col)
    np.testing.assert_array_equal(a.steps["lr"], b.steps["lr"])


def test_fsdp_band_and_norms_equal_single_process_float64(runs):
    out, reports, _ = runs
    for name in ("sgd64", "adamw64", "proj64"):
        a, b = phasewatch.open_run(out / name), phasewatch.open_run(out / f"{name}-single")
        assert len(a.segments) == 1 and not a.warnings
        assert not (out / f"{name}-rank1").exists()  # rank 1 opened no file
        assert a.meta["recorder"]["sharding"] == {"kind": "fsdp2", "placement": "Shard(0)", "world_size": 2}
        assert a.meta["model"]["params"] == b.meta["model"]["params"]  # global shapes, same groups
        assert a.meta["model"]["groups"] == b.meta["model"]["groups"]
        _compare(a, b, rtol=1e-10)
        # rank 0's loss: its half of the batch (finite every step, whether given before or after step())
        assert np.all(np.isfinite(a.steps["loss"]))
        # the analysis sees the same run
        ra, rb = phasewatch.analyze(a, window=4), phasewatch.analyze(b, window=4)
        np.testing.assert_array_equal(ra.table["kstar"], rb.table["kstar"])
        np.testing.assert_allclose(ra.table["sigma"], rb.table["sigma"], rtol=1e-9)
        np.testing.assert_allclose(ra.table["A"], rb.table["A"], rtol=1e-8)
    # one all-reduce per block (30 steps, B = 4: 7 in steps + 1 at close; B = 3: 10 + none (nothing
    # pending); stride 2: 15 updates, 3 + 1)
    assert [reports[0][n]["all_reduce"] for n in ("sgd64", "adamw64", "proj64")] == [8, 10, 4]
    # one gather per scheduled step: snapshots at 21 .. 30, checkpoints at 7, 14, 21, 28 (two shared)
    assert reports[0]["sgd64"]["gather"] == 10 + 4 - 2
    assert reports[0] == reports[1]  # every rank took part in the same collectives
    # projected mode: the sharded folds sum to the single-process fold (same seed): same band
    a = phasewatch.open_run(out / "proj64")
    assert a.meta["recorder"]["mode"] == "projected" and len(a.meta["recorder"]["projected_tensors"]) == 4
    assert a.band["step"].tolist() == list(range(2, 31, 2))


def test_fsdp_snapshots_and_checkpoints_are_full_tensors(runs):
    out, _, _ = runs
    for name in ("sgd64", "proj64"):
        a, b = phasewatch.open_run(out / name), phasewatch.open_run(out / f"{name}-single")
        for table in ("snapshots", "checkpoints"):
            ta, tb = a.table(table), b.table(table)
            assert ta["step"].tolist() == tb["step"].tolist()
            for k in ta:
                if k != "step":
                    np.testing.assert_allclose(ta[k], tb[k], rtol=1e-10, atol=1e-13, err_msg=f"{name} {table} {k}")
    a = phasewatch.open_run(out / "sgd64")
    assert a.table("snapshots")["step"].tolist() == list(range(21, 31))
    assert a.table("checkpoints")["theta"].shape == (4, a.meta["model"]["n_params"])
    # the gathered full updates give the spectra of the band route (DEFINITIONS §1, snapshot route)
    ra, rs = phasewatch.analyze(a, window=4), phasewatch.analyze(a, window=4, source="snapshots")
    assert rs.table["step"].tolist() == list(range(24, 31))
    rows = np.searchsorted(ra.table["step"], rs.table["step"])
    np.testing.assert_allclose(rs.table["sigma"], ra.table["sigma"][rows], rtol=1e-9)
    np.testing.assert_array_equal(rs.table["kstar"], ra.table["kstar"][rows])


U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32, 2^-24
U64 = float(np.finfo(np.float64).eps) / 2


def _gamma(n: int, u: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative bound of a sum or dot product of n terms."""
    return n * u / (1 - n * u)


def _load_brute(path, n_t: int, steps: int = 30):
    """(θ_t, g_t) per step from a ``brute`` run: lists of per-tensor float arrays."""
    z = np.load(path)
    theta = [[z[f"theta{t}_{i}"] for i in range(n_t)] for t in range(steps)]
    grads = [[z[f"grad{t}_{i}"].astype(np.float64) for i in range(n_t)] for t in range(steps)]
    return theta, grads


def _lagged(x: np.ndarray, K: int) -> np.ndarray:
    """(T, K) with entry [t, j] = x[t − j] (NaN before the start)."""
    out = np.full((len(x), K), np.nan)
    for j in range(K):
        out[j:, j] = x[: len(x) - j]
    return out


def _band_of(u: np.ndarray, K: int) -> np.ndarray:
    """The band b_t[j] = ⟨u_t, u_{t−j}⟩ of updates u (T, n), by definition."""
    band = np.full((len(u), K), np.nan)
    for t in range(len(u)):
        for j in range(min(K, t + 1)):
            band[t, j] = u[t] @ u[t - j]
    return band


def _band_bound(u: np.ndarray, v: np.ndarray, K: int) -> np.ndarray:
    """Bound on |b_t[j](u) − b_t[j](v)| for two recorded trajectories with updates u, v (T, n).

    ⟨u_t, u_s⟩ − ⟨v_t, v_s⟩ = ⟨u_t − v_t, u_s⟩ + ⟨v_t, u_s − v_s⟩, so by Cauchy–Schwarz it is at most
    ‖Δu_t‖‖u_s‖ + ‖v_t‖‖Δu_s‖ (exact); each recording adds its float64 accumulation error
    γ_n(u64)·‖u_t‖‖u_s‖ against its own trajectory (n terms per entry).
    """
    nu, nv, d = (np.linalg.norm(a, axis=1) for a in (u, v, u - v))
    acc = _gamma(u.shape[1], U64)
    return (d[:, None] * _lagged(nu, K) + nv[:, None] * _lagged(d, K)
            + acc * (nu[:, None] * _lagged(nu, K) + nv[:, None] * _lagged(nv, K)))


def _norm_slack(xa: np.ndarray, xb: np.ndarray, unit: float) -> np.ndarray:
    """Rounding of two recorded norms: each is a sum of n squares in the stated precision (gradient
    norms: float32 per tensor, ``torch._foreach_norm``; update norms: float64), then a square root."""
    return (_gamma(xa.shape[1], unit) + unit) * (np.linalg.norm(xa, axis=1) + np.linalg.norm(xb, axis=1))


def test_fsdp_float32_exact_on_its_own_trajectory_and_close_to_single_process(runs):
    out, _, _ = runs
    a, b = phasewatch.open_run(out / "adamw32"), phasewatch.open_run(out / "adamw32-single")
    assert not (out / "adamw32-rank1").exists()
    # brute force on the FSDP run's own parameters, gathered with full_tensor() after every step
    params = a.meta["model"]["params"]
    n_t = len(params)
    theta_a, grads_a = _load_brute(out / "adamw32-brute.npz", n_t)
    theta_b, grads_b = _load_brute(out / "adamw32-single-brute.npz", n_t)
    import torch  # (the initial θ_0: the seeded model, before any step)

    ns: dict = {}
    exec(TRAIN, ns)
    theta0 = [p.detach().numpy().copy() for p in ns["build"](torch.float32).parameters()]

    def updates(theta, idx):  # float32 differences of the chosen tensors, as recorded, in float64
        flat = np.array([np.concatenate([th[i].ravel() for i in idx]) for th in [theta0] + theta])
        return np.diff(flat, axis=0).astype(np.float64)

    def flat_grads(grads, idx):
        return np.array([np.concatenate([g[i].ravel() for i in idx]) for g in grads])

    every = list(range(n_t))
    u, v = updates(theta_a, every), updates(theta_b, every)
    ga, gb = flat_grads(grads_a, every), flat_grads(grads_b, every)
    rec = a.band["band"]
    band = _band_of(u, 6)
    assert np.array_equal(np.isnan(rec), np.isnan(band))
    assert np.nanmax(np.abs(rec - band) / _scale(band)) < 1e-12
    np.testing.assert_allclose(a.steps["grad_norm"], np.linalg.norm(ga, axis=1), rtol=1e-6)  # float32 norms
    np.testing.assert_allclose(a.steps["update_norm"], np.linalg.norm(u, axis=1), rtol=1e-12)
    snap = a.table("snapshots")
    np.testing.assert_array_equal(snap["update"], u[[9, 19, 29]])

    # Against the single-process float32 run.  Both start from the same θ_0, and their first
    # gradients are two float32 evaluations of the same batch mean (FSDP: the reduce-scatter
    # average of two half-batch means).  First-order rounding bound (Higham, Accuracy and
    # Stability, §3.1): each element errs by at most γ_N·(mean_i |e_i|), e_i the per-example
    # gradients (float64 here), N the terms accumulated along the longest chain: the batch of 32
    # plus, forward and backward, the widths 6 + 20 + 13 + 3; the two evaluations at most twice that.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 32, 6, generator=g, dtype=torch.float32)[0].double()
    y = torch.randint(0, 3, (30, 32), generator=g)[0]
    m64 = ns["build"](torch.float64)
    env = np.zeros(ga.shape[1])
    for i in range(32):
        e = torch.autograd.grad(torch.nn.functional.cross_entropy(m64(x[i: i + 1]), y[i: i + 1]),
                                list(m64.parameters()))
        env += np.abs(torch.cat([t.reshape(-1) for t in e]).numpy()) / 32
    N = 32 + 2 * (6 + 20 + 13 + 3)
    d1 = np.linalg.norm(ga[0] - gb[0])
    assert d1 <= 2 * _gamma(N, U32) * np.linalg.norm(env), (d1, np.linalg.norm(env))
    # From there on the trajectories differ by those roundings as AdamW amplifies them (its
    # normalised steps divide by √v̂, so a rounding in a small gradient entry is not small in the
    # update).  Whatever the divergence, every recorded number must be explained by it: the band
    # within the Cauchy–Schwarz bound of the measured update differences (_band_bound), norms
    # within the triangle inequality ‖x‖ − ‖y‖ ≤ ‖x − y‖ plus float64 accumulation.
    assert a.steps["step"].tolist() == b.steps["step"].tolist() == list(range(1, 31))
    np.testing.assert_array_equal(a.steps["lr"], b.steps["lr"])
    rb = b.band["band"]
    assert np.array_equal(np.isnan(rec), np.isnan(rb))
    assert np.nanmax(np.abs(rec - rb) - _band_bound(u, v, 6)) <= 0
    groups = [gr["name"] for gr in a.meta["model"]["groups"]]
    la, lb = a.band["layer_band"], b.band["layer_band"]
    for k, name in enumerate(groups):
        idx = [i for i, p in enumerate(params) if p["group"] == name]
        uk, vk = updates(theta_a, idx), updates(theta_b, idx)
        assert np.nanmax(np.abs(la[:, k] - lb[:, k]) - _band_bound(uk, vk, 6)) <= 0, name
        gak, gbk = flat_grads(grads_a, idx), flat_grads(grads_b, idx)
        slack = _norm_slack(gak, gbk, U32)
        dg = np.abs(a.steps["layer_grad_norm"][:, k] - b.steps["layer_grad_norm"][:, k])
        assert np.all(dg <= np.linalg.norm(gak - gbk, axis=1) * (1 + 4 * U64) + slack), name
    np.testing.assert_allclose(la.sum(axis=1), rec, rtol=1e-12, atol=1e-15 * np.nanmax(rec))
    for col, xa, xb, unit in (("grad_norm", ga, gb, U32), ("update_norm", u, v, U64)):
        slack = _norm_slack(xa, xb, unit)
        diff = np.abs(a.steps[col] - b.steps[col])
        assert np.all(diff <= np.linalg.norm(xa - xb, axis=1) * (1 + 4 * U64) + slack), col
    # the divergence itself stays far below the O(1) difference of a wrong reduction (a sum instead
    # of a mean, a rank using the other half of the batch)
    rel = np.linalg.norm(u - v, axis=1) / np.linalg.norm(v, axis=1)
    assert rel.max() < 1e-2, rel.max()


def test_fsdp_failure_on_one_rank_stops_every_rank_and_training_continues(runs):
    out, reports, errs = runs
    ref = phasewatch.open_run(out / "sgd64-single")
    for bad in (0, 1):
        assert reports[0][f"fail{bad}"] and reports[1][f"fail{bad}"]  # both trained all 30 steps
        run = phasewatch.open_run(out / f"fail{bad}")
        # the failure at step 11 reaches every rank at the all-reduce after step 12; rows reduced
        # before it (steps 1..8) are written and exact
        assert run.steps["step"].tolist() == list(range(1, 9))
        np.testing.assert_allclose(run.band["band"], ref.band["band"][:8], rtol=1e-10)
        assert not (out / f"fail{bad}-rank1").exists()
    assert "recorder disabled on rank 1" in errs[1] and "recording stopped on rank 0" in errs[0]


def test_fsdp_errors_are_one_clear_line(runs):
    _, reports, _ = runs
    for rep in reports:
        partly, replicate, per_rank, probe = rep["errors"]
        assert partly.startswith("parameters are partly sharded: 0.weight is a DTensor (FSDP2) but 2.weight")
        assert "apply fully_shard to the root module" in partly
        assert "placements (Replicate(),)" in replicate and "(Shard(0),) on a 1-D mesh" in replicate
        assert per_rank.startswith("grad_source='per_rank' is not supported for FSDP-sharded")
        assert probe.startswith("grad_probe is not supported for FSDP-sharded")
        assert all("\n" not in e for e in rep["errors"])


def _brute_noise_stats(G: np.ndarray, groups: list[slice], n_max: int) -> dict:
    """The grad_samples columns of n samples G (n, P) by their definitions (DEFINITIONS §2)."""
    n = G.shape[0]
    gbar = G.mean(0)
    D = G - gbar
    d2 = (D * D).sum(1)  # ‖g_i − ḡ‖²
    v = D @ gbar  # ⟨g_i − ḡ, ḡ⟩
    K = D @ D.T
    eigs = np.sort(np.linalg.eigvalsh(K))[::-1].clip(0) / (n - 1)
    cov = np.full(n_max, np.nan)
    cov[: min(n_max, n - 1)] = eigs[: min(n_max, n - 1)]
    norms = np.full(n_max, np.nan)
    norms[: min(n_max, n)] = np.linalg.norm(G, axis=1)[:n_max]
    return {"mean_sq_norm": gbar @ gbar, "trace": d2.sum() / (n - 1), "quad": v @ v / (n - 1),
            "trace_sq": (K * K).sum() / (n - 1) ** 2, "fourth": (d2**2).mean(), "third": (v * d2).mean(),
            "layer_mean_sq_norm": np.array([gbar[s] @ gbar[s] for s in groups]),
            "layer_trace": np.array([(D[:, s] ** 2).sum() / (n - 1) for s in groups]),
            "cov_eigs": cov, "sample_norms": norms}


def test_fsdp_micro_batch_gradient_samples_equal_brute_force(runs):
    out, reports, _ = runs
    run = phasewatch.open_run(out / "mb64")
    gs = run.table("grad_samples")
    assert gs["step"].tolist() == [2, 4, 6, 8, 10]
    assert gs["n"].tolist() == [3] * 5 and set(gs["source"].tolist()) == {b"micro_batch"}
    assert gs["b"].tolist() == [8.0] * 5  # grad_microbatch_size 4 per rank × 2 ranks
    # brute force: the full micro-batch gradients (8 examples each) of the plain model trained on one
    # process, at the θ each scheduled step starts from (the trajectories agree to ~1e-15 in float64)
    G = np.load(out / "mb64-brute.npy")
    assert G.shape[:2] == (5, 3)
    n_params = run.meta["model"]["n_params"]
    assert G.shape[2] == n_params == 6 * 20 + 20 + 20 * 13 + 13 + 13 * 3 + 3
    # layer groups: "hidden" = 0.* and 2.* (the first 6·20+20 + 20·13+13 coordinates), "out" = 4.*
    cut = 6 * 20 + 20 + 20 * 13 + 13
    groups = [slice(0, cut), slice(cut, n_params)]
    for r in range(5):
        want = _brute_noise_stats(G[r], groups, 4)
        for k, w in want.items():
            np.testing.assert_allclose(gs[k][r], w, rtol=1e-10, atol=1e-13 * abs(want["trace"]), err_msg=f"{k} {r}")
    # one sample all-reduce per scheduled step (5), plus the band's: 10 steps, B = 4: 2 + 1 at close
    assert reports[0]["mb64"]["all_reduce"] == 5 + 3
    assert reports[0]["mb64"] == reports[1]["mb64"]
    # the band is unchanged by the sampling (same as the single-process run)
    single = phasewatch.open_run(out / "mb64-single")
    np.testing.assert_allclose(run.band["band"], single.band["band"], rtol=1e-10)


def test_fsdp_failure_before_a_sample_all_reduce_stops_every_rank(runs):
    out, reports, errs = runs
    # rank 1 fails at step 5; every rank meets at step 6's sample all-reduce (rank 1 sends status 0)
    # and stops there: all-reduces at steps 2 (samples), 4 (samples, band block), 6 (samples)
    assert reports[0]["failmb"] == reports[1]["failmb"] == [4, 0]
    run = phasewatch.open_run(out / "failmb")
    assert run.table("grad_samples")["step"].tolist() == [2, 4]
    assert run.steps["step"].tolist() == [1, 2, 3, 4]
    assert not (out / "failmb-rank1").exists()
