"""Cost of gradient-noise sampling: training with vs without per-example / micro-batch samples.

Measured side by side in one run (interleaved rounds), on an MLP 784-256-256-10 (≈270k
parameters) with batch 128, AdamW, cross-entropy on random data:
  - recorder without gradient samples (the baseline the sampling adds to),
  - per-example samples of a 64-example probe batch every N steps (torch.func vmap over grad),
  - micro-batch samples (4 micro-batches of 32 per step, gradient accumulation) every N steps,
  - per-example samples plus projected samples (``grad_proj``): 256 exact coordinates, a Gaussian
    sketch to d = 64 (R cached: 64 × 270k float32 = 69 MB) and to d = 128 (R above the 128 MiB cache:
    regenerated from its seeds at every measurement),
and plain training without a recorder.  Prints ms/step medians and ratios ("vs base": against the
same training without the sampling, or, for the projections, against per-example samples alone).

    python benchmarks/grad_samples_overhead.py [--every 10] [--rounds 7] [--steps 40] [--cpu-time]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

import phasewatch


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _dir(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time (with OMP_NUM_THREADS=1: robust on a machine others load)")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    probe = (torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g))
    tmp = tempfile.mkdtemp(prefix="pw-gs-")
    clock = time.process_time if a.cpu_time else time.perf_counter

    def per_example_loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    configs = {
        "plain": {"rec": None, "micro": 1},
        "recorder": {"rec": {}, "micro": 1},
        "per-example": {"rec": {"grad_samples_every": a.every, "grad_probe": probe,
                                "grad_loss": per_example_loss}, "micro": 1},
        "recorder, 4 micro": {"rec": {}, "micro": 4},
        "micro-batch": {"rec": {"grad_samples_every": a.every, "grad_microbatch_size": 32}, "micro": 4},
    }
    for label, proj in (("+ coords 256", {"grad_proj_dim": 256, "grad_proj": "coords"}),
                        ("+ gauss 64 cached", {"grad_proj_dim": 64, "grad_proj": "gaussian"}),
                        ("+ gauss 128 regen.", {"grad_proj_dim": 128, "grad_proj": "gaussian"})):
        configs[label] = {"rec": {**configs["per-example"]["rec"], **proj}, "micro": 1}
    state = {}
    for name, c in configs.items():
        model, opt = make()
        rec = None
        if c["rec"] is not None:
            rec = phasewatch.Recorder(f"{tmp}/{_dir(name)}", model, opt, **c["rec"])
        state[name] = (model, opt, rec, c["micro"])

    def run(name: str, n: int) -> float:
        model, opt, rec, micro = state[name]
        t0 = clock()
        for _ in range(n):
            opt.zero_grad()
            for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
                loss = torch.nn.functional.cross_entropy(model(xb), yb) / micro
                loss.backward()
            opt.step()
        return (clock() - t0) / n

    for name in configs:
        run(name, 10)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in configs}
    order = list(configs)
    for r in range(a.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(run(name, a.steps))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"MLP 784-256-256-10, batch 128, samples every {a.every} steps; {a.rounds} rounds x {a.steps} steps; "
          f"{'process CPU time' if a.cpu_time else 'wall time'}, {torch.get_num_threads()} thread(s)")
    print(f"{'configuration':<20} {'ms/step':>8} {'vs plain':>9} {'vs base':>8}  base")
    base = {"plain": "plain", "recorder": "plain", "per-example": "recorder",
            "recorder, 4 micro": "plain", "micro-batch": "recorder, 4 micro"}
    for k, v in med.items():
        b = base.get(k, "per-example")
        print(f"{k:<20} {v:8.2f} {v / med['plain']:9.3f} {v / med[b]:8.3f}  {b}")
    for _, _, rec, _ in state.values():
        if rec is not None:
            rec.close()
    for name in ("per-example", "micro-batch", "+ coords 256", "+ gauss 128 regen."):
        run = phasewatch.open_run(f"{tmp}/{_dir(name)}")
        rows = run.table("grad_samples")
        extra = f", {len(run.heavy_steps('grad_proj'))} grad_proj rows" if "grad_proj" in run.meta["tables"] else ""
        print(f"{name}: {len(rows['step'])} measurements recorded, n = {sorted(set(rows['n'].tolist()))}{extra}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
