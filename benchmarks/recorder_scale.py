#!/usr/bin/env python
"""The recorder's per-step cost against an AdamW step, for P = 10^6 .. 10^8 parameters, and the
accuracy of projected-mode spectra against exact ones — side by side in one run.

    .venv/bin/python benchmarks/recorder_scale.py            # P = 1e6, 1e7, 1e8 (~10 min, ~12 GB peak)
    .venv/bin/python benchmarks/recorder_scale.py --quick    # P = 1e6, 1e7 (~2 min, ~3 GB)

Setup.  P float32 parameters in 8 equal tensors (8 layer groups), one ``torch.optim.AdamW``
(default: foreach).  No model: gradients are set directly, so what is timed is ``optimizer.step()``
alone, with and without the recorder's hooks inside it — the recorder's cost is the difference.
One torch thread by default (``--threads``): on a shared 2-core machine two threads spin and the
timings scatter by 10x.
A real training step adds forward and backward passes (typically several times the optimizer
step), so the ratios printed here are upper bounds of the recorder's share of a training step.

Cost.  Configurations: ``exact`` (float64 ring of R = B·⌈(K−1+B)/B⌉ updates, run only if it fits
in memory), ``projected`` (sign-fold to d = 8192 per tensor; the ring is then tiny), and
``projected`` with ``stride=4`` (a displacement every 4 steps).  K = 16, B = 8.  Each recorder is
opened, warmed up for one block (not timed), timed over N steps (a multiple of B, so each round
holds the same number of band GEMMs and writer flushes), and closed; every recorder round is
bracketed by recorder-free rounds of the same optimizer, and the recorder's cost is the median over
repetitions of (its round − the mean of its two neighbours).

Accuracy.  An exact and a projected recorder watch the same trajectory (both attached to one
optimizer), with gradients g_t = Σ_i s_i c_{t,i} a_i + σ ξ_t: r = 3 fixed random directions of
decreasing scale plus isotropic noise, so the update spectra have a gap.  Both runs are analysed
(W = 8) and compared: the fraction of windows with the same k*, the relative error of the gap ratio
σ_k*/σ_k*+1 and of σ_1 (theory for the inner products: relative error ~ √(2/d) per tensor).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import phasewatch

N_TENSORS = 8
K, BLOCK = 16, 8


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def make_params(P: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    n = P // N_TENSORS
    return [torch.nn.Parameter(torch.randn(n, generator=g) * 0.02) for _ in range(N_TENSORS)]


class Holder(torch.nn.Module):
    """A module around the parameters (the recorder takes names from ``named_parameters``)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(params)


def ring_bytes(P: int, k: int, block: int) -> int:
    return block * -(-(k - 1 + block) // block) * P * 8


def accuracy_bytes(P: int, k: int, block: int) -> int:
    """Peak memory of the accuracy run: the exact ring, plus per parameter 4 bytes each for θ, its
    gradient, both θ_prev copies, the fold signs and scratch, 8 for AdamW's state, 12 for the 3
    gradient directions and 8 for temporaries."""
    return ring_bytes(P, k, block) + 52 * P


def time_steps(opt: torch.optim.Optimizer, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        opt.step()
    return (time.perf_counter() - t0) / n


def cost(P: int, steps: int, rounds: int, tmp: Path, log_lines: list[str]) -> dict:
    params = make_params(P)
    model = Holder(params)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3  # fixed gradients: AdamW still updates
    opt = torch.optim.AdamW(params, lr=1e-3)
    time_steps(opt, 2)  # creates AdamW state
    configs = {"projected": dict(mode="projected"), "projected/4": dict(mode="projected", stride=4)}
    # the exact ring plus its companions (θ_prev, params, grads, AdamW state) must fit
    need = ring_bytes(P, K, BLOCK) + 5 * 4 * P
    if need < 0.6 * mem_available():
        configs = {"exact": dict(mode="exact"), **configs}
    else:
        log_lines.append(f"P={P:.0e}: exact skipped (ring {ring_bytes(P, K, BLOCK) / 2**30:.1f} GiB + state "
                         f"> 60% of {mem_available() / 2**30:.1f} GiB available)")
    base: list[float] = []
    diff: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        before = time_steps(opt, steps)
        base.append(before)
        for name, kw in configs.items():
            rec = phasewatch.Recorder(tmp / f"P{P}-{name.replace('/', '_')}-{r}", model, opt, k=K, block=BLOCK,
                                      memory_budget=1 << 62, strict=True, flush_seconds=1e9, **kw)
            time_steps(opt, BLOCK * kw.get("stride", 1))  # warm-up: one band block (not timed)
            t = time_steps(opt, steps)
            rec.close()
            del rec
            gc.collect()
            after = time_steps(opt, steps)
            base.append(after)
            diff[name].append(t - 0.5 * (before + after))  # paired with its neighbours
            before = after
    res = {"P": P, "adamw": statistics.median(base), "adamw_min": min(base)}
    for name, ds in diff.items():
        res[name] = statistics.median(ds)
    del opt, params, model
    gc.collect()
    return res


def accuracy(P: int, steps: int, tmp: Path, k: int, block: int, proj_dim: int) -> dict:
    params = make_params(P, seed=2)
    model = Holder(params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    n = P // N_TENSORS
    r = 3
    dirs = [torch.randn(r, n, generator=gen) / math.sqrt(P) for _ in range(N_TENSORS)]  # unit-ish norm
    scales = torch.tensor([6.0, 3.0, 1.5])
    sigma = 0.5 / math.sqrt(P)
    ex = phasewatch.Recorder(tmp / f"acc-exact-{P}", model, opt, k=k, block=block, mode="exact",
                             memory_budget=1 << 62, strict=True)
    pr = phasewatch.Recorder(tmp / f"acc-proj-{P}", model, opt, k=k, block=block, mode="projected",
                             proj_dim=proj_dim, strict=True)
    for _ in range(steps):
        c = torch.randn(r, generator=gen) * scales
        for p, d in zip(params, dirs):
            p.grad = c @ d + sigma * torch.randn(n, generator=gen)
        opt.step()
    ex.close()
    pr.close()
    a = phasewatch.analyze(phasewatch.open_run(tmp / f"acc-exact-{P}"), window=8)
    b = phasewatch.analyze(phasewatch.open_run(tmp / f"acc-proj-{P}"), window=8)
    v = a.table["valid"] & b.table["valid"]
    ka, kb = a.table["kstar"][v], b.table["kstar"][v]
    ra, rb = a.table["gap_ratio"][v], b.table["gap_ratio"][v]
    same = ka == kb
    rel_r = np.abs(rb[same] / ra[same] - 1)
    s1 = np.abs(b.table["sigma"][v][:, 0] / a.table["sigma"][v][:, 0] - 1)
    del opt, params, model, dirs
    gc.collect()
    return {"P": P, "windows": int(v.sum()), "kstar_agree": float(same.mean()), "kstar_mode": int(np.bincount(ka).argmax()),
            "ratio_med": float(np.median(rel_r)) if rel_r.size else float("nan"),
            "ratio_p90": float(np.quantile(rel_r, 0.9)) if rel_r.size else float("nan"),
            "sigma1_med": float(np.median(s1)), "theory": math.sqrt(2 / proj_dim), "k": k, "block": block}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="P = 1e6 and 1e7 only")
    ap.add_argument("--sizes", type=float, nargs="*", default=None, help="override the list of P")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (multiple of 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--acc-steps", type=int, default=48)
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared machine; 2 threads spin when it is busy)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("phasewatch").setLevel(logging.WARNING)
    sizes = [int(s) for s in (args.sizes or ([1e6, 1e7] if args.quick else [1e6, 1e7, 1e8]))]
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load}, "
          f"{mem_available() / 2**30:.1f} GiB available; K={K}, B={BLOCK}, {N_TENSORS} tensors, float32")
    notes: list[str] = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="pw-scale-") as d:
        tmp = Path(d)
        for P in sizes:
            steps = args.steps or (16 if P >= 10**8 else 32 if P >= 10**7 else 64)
            steps = BLOCK * 4 * -(-steps // (BLOCK * 4))  # whole blocks, also with stride 4
            rows.append(cost(P, steps, args.rounds, tmp, notes))
            r = rows[-1]
            cells = [f"{r['adamw'] * 1e3:9.1f}"]
            for name in ("exact", "projected", "projected/4"):
                cells.append(f"{r[name] * 1e3:8.1f} ({r[name] / r['adamw']:5.2f}x)" if name in r else f"{'-':>17}")
            if len(rows) == 1:
                print("\nper-step cost (ms): AdamW step (median; min) vs the recorder's extra time inside it "
                      "(median of paired differences; ratio to the AdamW median)")
                print(f"{'P':>6} {'AdamW':>9} {'min':>7} {'exact':>17} {'projected':>17} {'proj. stride 4':>17}")
            cells.insert(1, f"{r['adamw_min'] * 1e3:7.1f}")
            print(f"{P:6.0e} " + " ".join(cells), flush=True)
        for line in notes:
            print("  " + line)

        print(f"\naccuracy of projected spectra (d={args.proj_dim} per tensor, W=8) against exact, same trajectory")
        print(f"{'P':>6} {'K,B':>5} {'windows':>7} {'k* agree':>8} {'k* mode':>7} {'|dR/R| med':>10} {'p90':>8} "
              f"{'|ds1/s1| med':>12} {'sqrt(2/d)':>9}")
        for P in sizes:
            k, block = K, BLOCK
            if accuracy_bytes(P, k, block) > 0.75 * mem_available():
                k, block = 9, 1  # the smallest exact ring that still allows W = 8
            if accuracy_bytes(P, k, block) > 0.75 * mem_available():
                print(f"{P:6.0e}  skipped: an exact ring does not fit in memory")
                continue
            a = accuracy(P, args.acc_steps, tmp, k, block, args.proj_dim)
            print(f"{P:6.0e} {f'{k},{block}':>5} {a['windows']:7d} {a['kstar_agree']:8.1%} {a['kstar_mode']:7d} "
                  f"{a['ratio_med']:10.2e} {a['ratio_p90']:8.2e} {a['sigma1_med']:12.2e} {a['theory']:9.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
