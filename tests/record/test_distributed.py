"""Under DDP (real processes, gloo on CPU) only rank 0 writes, and its band is the single-process band."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

import phasewatch

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import phasewatch
    rank, world, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    if mode == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with phasewatch.Recorder(out, model, opt, k=6, block=4, strict=True) as rec:
        for _ in range(25):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.loss(loss)
            opt.step()
            rec.log(step=rec.step, probe=float(rec.step))  # rec.step exists on every rank
    assert rec.step == 25, (rank, rec.step)
    if mode == "ddp":
        dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort it (std::terminate, exit -6)
    sys.stdout.flush(); os._exit(0)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_rank0_writes_and_band_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "ddp"), "ddp"], env=env)
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    single = subprocess.run([sys.executable, str(script), "0", "1", str(tmp_path / "single"), "single"],
                            timeout=120)
    assert single.returncode == 0
    ddp, one = phasewatch.open_run(tmp_path / "ddp"), phasewatch.open_run(tmp_path / "single")
    assert len(ddp.segments) == 1 and not ddp.warnings  # one writer: rank 0
    assert ddp.steps["step"].tolist() == list(range(1, 26))
    # DDP averages the two half-batch gradients: the same update as the full batch on one process
    b, b1 = ddp.band["band"], one.band["band"]
    assert np.array_equal(np.isnan(b), np.isnan(b1))
    np.testing.assert_allclose(b, b1, rtol=1e-9, atol=1e-14 * np.nanmax(np.abs(b1)))
    np.testing.assert_allclose(ddp.band["layer_band"], one.band["layer_band"], rtol=1e-9,
                               atol=1e-14 * np.nanmax(np.abs(b1)))
    # the loss is rank 0's half-batch loss (documented: each rank's rec.loss is its own)
    assert np.all(np.isfinite(ddp.steps["loss"]))


PER_RANK_WORKER = textwrap.dedent("""
    import copy, os, sys, numpy as np, torch, torch.distributed as dist
    import phasewatch
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own shard
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.5)
    m = 3  # micro-batches per step
    rec = phasewatch.Recorder(out + "/run", ddp, opt, k=4, block=2, strict=True, grad_samples_every=[1, 2, 4, 5], grad_source="per_rank",
                              grad_microbatch_size=8, groups={"first": ["module.0"], "last": ["module.2"]})
    names = [n for n, _ in model.named_parameters()]
    for step in range(1, 6):
        xs = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(m)]
        ys = [torch.randint(0, 3, (8,), generator=g) for _ in range(m)]
        # brute force: this rank's gradient of each of its micro-batches, at the step's starting θ
        ref = copy.deepcopy(model)
        bf = [torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), list(ref.parameters()))
              for x, y in zip(xs, ys)]
        np.savez(f"{out}/bf-{rank}-{step}.npz", **{n: np.stack([b[i].numpy() for b in bf])
                                                  for i, n in enumerate(names)})
        opt.zero_grad()
        for k, (x, y) in enumerate(zip(xs, ys)):
            # odd steps accumulate under no_sync (one all-reduce), even steps all-reduce every backward
            ctx = ddp.no_sync() if (step % 2 and k < m - 1) else torch.enable_grad()
            with ctx:
                loss = torch.nn.functional.cross_entropy(ddp(x), y) / m
                loss.backward()
            rec.loss(loss * m)
        if rank == 0:
            np.save(f"{out}/grad-{step}.npy", torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy())
        opt.step()
    rec.close()
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort it (std::terminate, exit -6)
    sys.stdout.flush(); os._exit(0)
""")


def test_ddp_per_rank_samples_equal_brute_force(tmp_path):
    """n = ranks × micro-batches local gradients, before the all-reduce, with and without no_sync."""
    from phasewatch.analysis.noise import sufficient_statistics

    script = tmp_path / "worker.py"
    script.write_text(PER_RANK_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path)], env=env)
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    run = phasewatch.open_run(tmp_path / "run")
    assert len(run.segments) == 1 and not run.warnings
    assert run.meta["recorder"]["grad_samples_source"] == "per_rank"
    gs = run.table("grad_samples")
    assert gs["step"].tolist() == [1, 2, 4, 5]
    assert gs["n"].tolist() == [6] * 4 and np.all(gs["b"] == 8)
    assert all(s == b"per_rank" for s in gs["source"])
    for row, step in enumerate(gs["step"].tolist()):
        per_rank = [np.load(tmp_path / f"bf-{r}-{step}.npz") for r in range(2)]
        names = list(per_rank[0].files)

        def samples(prefix="", per_rank=per_rank, names=names):
            return np.concatenate([np.concatenate([z[n].reshape(3, -1) for n in names if n.startswith(prefix)], axis=1)
                                   for z in per_rank])  # rank 0's three micro-batches, then rank 1's

        full = sufficient_statistics(samples(), b=8)
        for col in ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third"):
            np.testing.assert_allclose(gs[col][row], getattr(full, col), rtol=1e-10, err_msg=f"{col} step {step}")
        for li, prefix in enumerate(("0.", "2.")):
            part = sufficient_statistics(samples(prefix), b=8)
            np.testing.assert_allclose(gs["layer_mean_sq_norm"][row, li], part.mean_sq_norm, rtol=1e-10)
            np.testing.assert_allclose(gs["layer_trace"][row, li], part.trace, rtol=1e-10)
        np.testing.assert_allclose(gs["sample_norms"][row, :6], np.linalg.norm(samples(), axis=1), rtol=1e-10)
        assert np.all(np.isnan(gs["sample_norms"][row, 6:]))
        # the mean of the samples is the all-reduced gradient the optimizer used
        g_opt = np.load(tmp_path / f"grad-{step}.npy")
        np.testing.assert_allclose(gs["mean_sq_norm"][row], g_opt @ g_opt, rtol=1e-10)


def test_per_rank_needs_a_process_group(tmp_path):
    import pytest
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(phasewatch.RecorderError, match="per_rank.*process group"):
        phasewatch.Recorder(tmp_path / "r", model, opt, grad_samples_every=1, grad_source="per_rank")
    with pytest.raises(phasewatch.RecorderError, match="grad_source="):
        phasewatch.Recorder(tmp_path / "r", model, opt, grad_samples_every=1, grad_source="per_rank_typo")
    assert not (tmp_path / "r").exists()


CURVATURE_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import phasewatch
    rank, world, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    if mode == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    px = torch.randn(40, 6, generator=g, dtype=torch.float64)  # the probe batch
    py = torch.randint(0, 3, (40,), generator=g)
    net = model
    if mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        cut = [0, 26, 40]  # unequal shares: the all-reduce must weight by shard size
        px, py = px[cut[rank]:cut[rank + 1]], py[cut[rank]:cut[rank + 1]]
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5)
    ce = torch.nn.functional.cross_entropy
    broken = sys.argv[5] == "broken"  # rank 1's probe loss raises: rank 0's probe must fail, not hang

    def probe_loss(out, t):
        if broken and rank == 1:
            raise ValueError("rank 1 cannot evaluate the probe loss")
        return ce(out, t)

    with phasewatch.Recorder(out, net, opt, k=4, block=2, strict=not broken, groups=lambda n: n.split(".")[-2],
                             curvature_every=[2, 5], curvature_batch=(px, py), curvature_loss=probe_loss,
                             curvature_topk=2, curvature_tol=1e-10, curvature_trace=8,
                             curvature_groups=True, curvature_hvp="auto" if broken else sys.argv[5]) as rec:
        for _ in range(6):
            opt.zero_grad()
            loss = ce(net(x), y)
            loss.backward()
            rec.loss(loss)
            opt.step()
    if mode == "ddp":
        dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort it (std::terminate, exit -6)
    sys.stdout.flush(); os._exit(0)
""")


def test_ddp_curvature_probe_equals_the_single_process_probe_on_the_whole_batch(tmp_path):
    """Each rank probes its (unequal) share of the probe batch, the products are all-reduced: λ_max,
    the top-2 eigenvalues, the per-group λ_max, the loss and the Hutchinson trace (same seeds, same
    Rademacher vectors) equal one process's probe on the whole batch.  hvp='auto' also runs the
    FD check through the protocol (several operators per session)."""
    script = tmp_path / "worker.py"
    script.write_text(CURVATURE_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "ddp"), "ddp", "auto"],
                              env=env) for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    single = subprocess.run([sys.executable, str(script), "0", "1", str(tmp_path / "one"), "single", "auto"],
                            timeout=180)
    assert single.returncode == 0
    ddp, one = phasewatch.open_run(tmp_path / "ddp"), phasewatch.open_run(tmp_path / "one")
    assert len(ddp.segments) == 1 and not ddp.warnings  # one writer: rank 0
    a, b = ddp.table("curvature"), one.table("curvature")
    assert a["step"].tolist() == b["step"].tolist() == [2, 5]
    assert ddp.meta["recorder"]["curvature"]["distributed"] == {"kind": "ddp", "world_size": 2}
    assert np.all(a["converged"] == 1) and [h.decode() for h in a["hvp"]] == ["autograd"] * 2
    # float64 throughout: θ differs between the runs by the rounding of the averaged gradient (the
    # band test's 1e-9), the probe sums two weighted shard products in another order (~u·P·|H|);
    # the eigenvalues inherit both, with the Lanczos tolerance 1e-10 (Weyl) on top
    for col in ("eigenvalues", "group_lambda", "loss", "trace", "u_curvature"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-8, err_msg=col)
    assert np.all(np.isfinite(a["group_lambda"])) and np.all(a["group_lambda"] <= a["eigenvalues"][:, :1] * (1 + 1e-8))
    np.testing.assert_array_equal(a["trace_probes"], b["trace_probes"])


def test_ddp_curvature_probe_by_finite_differences_runs_on_every_rank(tmp_path):
    """hvp='fd': every product is two gradients per rank on its share; each rank picks its own FD
    step, so the rows equal the one-process FD probe to FD's accuracy (noise floor 100·u^{2/3})."""
    script = tmp_path / "worker.py"
    script.write_text(CURVATURE_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "ddp"), "ddp", "fd"],
                              env=env) for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    single = subprocess.run([sys.executable, str(script), "0", "1", str(tmp_path / "one"), "single", "fd"],
                            timeout=180)
    assert single.returncode == 0
    a = phasewatch.open_run(tmp_path / "ddp").table("curvature")
    b = phasewatch.open_run(tmp_path / "one").table("curvature")
    assert [h.decode() for h in a["hvp"]] == ["fd"] * 2
    np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], rtol=4 * 100 * (2.0**-53) ** (2 / 3))


def test_ddp_curvature_probe_failing_on_another_rank_switches_off_without_a_hang(tmp_path):
    """Rank 1's share cannot be evaluated: rank 0's probe fails (the failure flag of the build's
    all-reduce), is switched off, and at the next scheduled step every rank still meets (rank 0
    just says stop); training and the rest of the recording go on."""
    script = tmp_path / "worker.py"
    script.write_text(CURVATURE_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "ddp"), "ddp", "broken"],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    run = phasewatch.open_run(tmp_path / "ddp")
    assert run.steps["step"].tolist() == list(range(1, 7))
    assert len(run.table("curvature")["step"]) == 0
    assert "curvature probe failed at step 2" in outs[0] and "could not be built on 1 rank(s)" in outs[0]
