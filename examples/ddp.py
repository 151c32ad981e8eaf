"""Record a DistributedDataParallel run (2 CPU processes, gloo), with per-rank gradient noise.

    python examples/ddp.py                            (~15 s on 2 CPU cores; no torchrun needed)
    python examples/ddp.py --out runs/ddp --steps 400

Two processes are spawned with ``torch.multiprocessing``; each trains the same DDP model on its own
shard of every batch, accumulating 2 micro-batches under ``no_sync()`` (one all-reduce per step).
Every rank builds the recorder with the same arguments (and closes it at the same point); only
rank 0 writes.  With ``grad_source="per_rank"``, every 10 steps the recorder measures gradient noise from the ranks' local
micro-batch gradients, captured before the all-reduce: n = 2 ranks × 2 micro-batches = 4 samples
(source ``per_rank``), at no extra forward/backward cost.  The band equals that of the same run on
one process (the all-reduced update is the full-batch update).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import phasewatch

WORLD = 2
MICRO = 2      # micro-batches per step, per rank
BATCH = 32     # examples per micro-batch, per rank


def worker(rank: int, out: str, steps: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=2e-3, weight_decay=0.01)
    teacher = torch.nn.Linear(20, 4)
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(7))
    data = torch.Generator().manual_seed(100 + rank)  # each rank draws its own shard
    test_x = torch.randn(512, 20, generator=torch.Generator().manual_seed(1))
    test_y = teacher(test_x).argmax(-1)

    # every rank builds the recorder (per-rank samples are a collective); only rank 0 writes
    with phasewatch.Recorder(out, ddp, opt, k=16, grad_samples_every=10, grad_source="per_rank",
                             grad_microbatch_size=BATCH) as rec:
        for step in range(1, steps + 1):
            opt.zero_grad()
            for k in range(MICRO):
                x = torch.randn(BATCH, 20, generator=data)
                with torch.no_grad():
                    y = teacher(x).argmax(-1)
                ctx = ddp.no_sync() if k < MICRO - 1 else torch.enable_grad()  # all-reduce on the last only
                with ctx:
                    loss = torch.nn.functional.cross_entropy(ddp(x), y) / MICRO
                    loss.backward()
                rec.loss(loss * MICRO)  # rank 0's loss is recorded; on other ranks this is a no-op
            opt.step()
            if step % 25 == 0:
                with torch.no_grad():
                    acc = (model(test_x).argmax(-1) == test_y).float().mean()
                rec.log(step, test_acc=acc)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="phasewatch-ddp-") + "/run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(out, args.steps, port), nprocs=WORLD, join=True)

    print(f"run: {out}")
    run = phasewatch.open_run(out)
    print(run.summary())
    gs = run.table("grad_samples")
    print(f"per-rank samples: {len(gs['step'])} measurements, n = {sorted(set(gs['n'].tolist()))} "
          f"(= {WORLD} ranks x {MICRO} micro-batches), source {gs['source'][0].decode()}")
    print(phasewatch.analyze(run, window=8).summary())


if __name__ == "__main__":
    main()
