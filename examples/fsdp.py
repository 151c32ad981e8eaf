"""Record an FSDP2 run (``fully_shard``, 2 CPU processes, gloo), and check it against one process.

    python examples/fsdp.py                            (< 1 min on 2 CPU cores; no torchrun needed)
    python examples/fsdp.py --out runs/fsdp --steps 400

Two processes are spawned with ``torch.multiprocessing``; the model is sharded with
``torch.distributed.fsdp.fully_shard`` on a 1-D CPU mesh (every parameter becomes a DTensor with
``Shard(0)`` placement), and each rank trains on its half of every batch.  Every rank builds the
recorder with the same arguments (and closes it at the same point: ``with`` does): each keeps only
its shard of the recent updates, one all-reduce per block of steps gives the full-model band and
gradient norms, and only rank 0 writes.  Snapshots are gathered to rank 0 on their schedule.

The script then trains the same model on the same data on this one process, without FSDP, and prints
how far the two recordings are apart (float64: ~1e-15 relative).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import phasewatch

WORLD = 2
BATCH = 64  # examples per step, over all ranks


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 4)).double()


def batches(steps: int):
    teacher = torch.nn.Linear(20, 4).double()
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(100)
    for _ in range(steps):
        x = torch.randn(BATCH, 20, generator=g, dtype=torch.float64)
        with torch.no_grad():
            y = teacher(x).argmax(-1)
        yield x, y


def train(out: str, steps: int, rank: int = 0, world: int = 1) -> None:
    model = make_model()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    # every rank builds the recorder with the same path; only rank 0 opens it
    with phasewatch.Recorder(out, model, opt, k=16, snapshot_every=50) as rec:
        for x, y in batches(steps):
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.loss(loss)  # rank 0's loss (its half of the batch) is recorded
            opt.step()


def worker(rank: int, out: str, steps: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    train(out, steps, rank, WORLD)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="phasewatch-fsdp-") + "/run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(out, args.steps, port), nprocs=WORLD, join=True)

    print(f"run: {out}")
    run = phasewatch.open_run(out)
    print(run.summary())
    print(phasewatch.analyze(run, window=8).summary())

    single = tempfile.mkdtemp(prefix="phasewatch-fsdp-single-") + "/run"
    train(single, args.steps)
    ref = phasewatch.open_run(single)
    for name, a, b in (("band", run.band["band"], ref.band["band"]),
                       ("grad_norm", run.steps["grad_norm"], ref.steps["grad_norm"]),
                       ("update_norm", run.steps["update_norm"], ref.steps["update_norm"])):
        print(f"FSDP vs one process, {name}: max relative difference {np.nanmax(np.abs(a - b) / np.abs(b)):.1e}")


if __name__ == "__main__":
    main()
