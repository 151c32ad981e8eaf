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
    torch.set_num_threads(1)
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
    if mode == "ddp":
        dist.destroy_process_group()
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
