#!/usr/bin/env python
"""phasewatch against Cockpit (Schneider et al. 2021, ``cockpit-for-pytorch`` on BackPACK): training
time with each, side by side in one process.

    python benchmarks/vs_cockpit.py            # the full table (11 min, one thread, on a loaded 2-core machine)
    python benchmarks/vs_cockpit.py --quick    # smoke run (< 1 min)

Needs Cockpit and BackPACK (``pip install --no-deps`` the ``bench`` extra's packages: BackPACK's torchvision
requirement, for its examples only, can replace the installed torch); without
them it prints how to install them and exits 0.

Cases (random inputs and labels, cross-entropy, SGD lr 0.01 momentum 0.9, the same seed and data for
every configuration):
  cnn     3C3D (DeepOBS CIFAR-10 layout: 3 conv + 3 dense, 895k parameters), 32x32x3 inputs, batch 128
  mlp     MLP 3072-2048-2048-10 (10.5M parameters), batch 128 (phasewatch only: Cockpit's per-example
          quantities outgrow a 23 GB machine there)
  mlp32   the same MLP, batch 32
Configurations per case: plain training; phasewatch's Recorder with default settings; the Recorder
measuring gradient statistics on a 64-example probe every 10 steps (``grad_samples_every=10``);
Cockpit's ``economy`` quantities every step and every 10th step; ``business`` every 10th step.  The
Cockpit configurations train a ``backpack.extend``-ed copy of the model and loss, as Cockpit requires.

Method: each configuration has its own model and optimizer (same initial weights).  After a warm-up
(excluded) the configurations of a case run in rounds, in alternating order (A B C .., .. C B A), of a
number of steps that is a multiple of 10 (so every round holds the same number of tracked steps of
every "every 10th" configuration), or 1-3 steps for Cockpit every step, which costs seconds a step.
Per round: ms/step and its ratio to that round's plain training.  Printed: median ratio over rounds and
its min-max.  The thread count is torch's (set OMP_NUM_THREADS to fix it); ``--cpu-time`` times by process
CPU time instead of wall time (on a loaded machine, with one thread, the robust choice).

Compatibility: Cockpit 1.0.2 reads its version with ``pkg_resources``, which setuptools >= 81 no
longer ships; when that import fails this script registers a stand-in ``pkg_resources`` module (in this
process only) whose ``get_distribution`` reads ``importlib.metadata``.  Nothing else was needed with
torch 2.13 and numpy 2.4 for the economy and business configurations.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import phasewatch

INSTALL = "pip install --no-deps cockpit-for-pytorch backpack-for-pytorch einops unfoldNd json-tricks seaborn"


def _shim_pkg_resources() -> None:
    """Cockpit's ``__init__`` calls ``pkg_resources.get_distribution``; setuptools >= 81 removed it."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        mod = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            try:
                return types.SimpleNamespace(version=importlib.metadata.version(name))
            except importlib.metadata.PackageNotFoundError as e:
                raise DistributionNotFound(name) from e

        mod.DistributionNotFound, mod.get_distribution = DistributionNotFound, get_distribution
        sys.modules["pkg_resources"] = mod


def c3d3() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 10))


CONFIGS = ["plain", "pw default", "pw + grad stats /10", "cockpit economy /1", "cockpit economy /10",
           "cockpit business /10"]
# (Cockpit on the MLP at batch 128 is left out: its per-example quantities hold ~4 GB a tracked step at
# batch 32, and at 128 this process was killed by the kernel at 22 GB resident)
CASES = {"cnn": ("3C3D CNN", c3d3, 128, CONFIGS), "mlp": ("MLP 3072-2048-2048-10", mlp, 128, CONFIGS[:3]),
         "mlp32": ("MLP 3072-2048-2048-10", mlp, 32, CONFIGS)}


def per_example_loss(out, t):
    return F.cross_entropy(out, t, reduction="none")


class Runner:
    """One configuration: its own model, optimizer, data cycle and (phasewatch or Cockpit) instrument."""

    def __init__(self, label: str, base: nn.Module, batch: int, tmp: str) -> None:
        import backpack
        from cockpit import Cockpit
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration

        self.label, self.step_no, self.rec, self.cockpit = label, 0, None, None
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        self.pool = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
                     for _ in range(8)]
        self.loss_fn = nn.CrossEntropyLoss()
        if label.startswith("pw"):
            kw = {}
            if "grad stats" in label:
                kw = {"grad_samples_every": 10, "grad_loss": per_example_loss,
                      "grad_probe": (torch.randn(64, 3, 32, 32, generator=g),
                                     torch.randint(0, 10, (64,), generator=g))}
            self.rec = phasewatch.Recorder(f"{tmp}/{label.replace(' ', '_').replace('/', '')}", self.model,
                                           self.opt, **kw)
        elif label.startswith("cockpit"):
            _, level, every = label.split()
            self.model = backpack.extend(self.model)
            self.loss_fn = backpack.extend(self.loss_fn)
            self.cockpit = Cockpit(self.model.parameters(),
                                   quantities=configuration(level, track_schedule=schedules.linear(int(every[1:]))))

    clock = staticmethod(time.perf_counter)

    def run(self, n: int) -> float:
        t0 = self.clock()
        for _ in range(n):
            x, y = self.pool[self.step_no % len(self.pool)]
            self.opt.zero_grad()
            out = self.model(x)
            loss = self.loss_fn(out, y)
            if self.cockpit is None:
                loss.backward()
            else:
                info = {"batch_size": len(y), "individual_losses": per_example_loss(out, y), "loss": loss,
                        "optimizer": self.opt}
                with self.cockpit(self.step_no, info=info):
                    loss.backward(create_graph=self.cockpit.create_graph(self.step_no))
            self.opt.step()
            if self.rec is not None:
                self.rec.loss(loss)
            self.step_no += 1
        return (self.clock() - t0) / n

    def close(self) -> None:
        if self.rec is not None:
            self.rec.close()


def bench_case(key: str, rounds: int, steps: int, slow_steps: int, tmp: str) -> dict:
    name, make, batch, configs = CASES[key]
    torch.manual_seed(0)
    base = make()
    runners = {c: Runner(c, base, batch, f"{tmp}/{key}") for c in configs}
    n_of = {c: (slow_steps if c == "cockpit economy /1" else steps) for c in configs}
    for c, r in runners.items():  # warm-up: one tracked step of every schedule, lazily created state
        r.run(n_of[c] if c == "cockpit economy /1" else 10)
    per_round: dict[str, list[float]] = {c: [] for c in configs}
    for i in range(rounds):
        for c in configs if i % 2 == 0 else configs[::-1]:
            per_round[c].append(runners[c].run(n_of[c]))
    for r in runners.values():
        r.close()
    params = sum(p.numel() for p in base.parameters())
    out = {"name": name, "P": params, "batch": batch, "plain_ms": statistics.median(per_round["plain"]) * 1e3}
    for c in configs[1:]:
        ratios = [t / p for t, p in zip(per_round[c], per_round["plain"])]
        out[c] = (statistics.median(ratios), min(ratios), max(ratios))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: the CNN at batch 16, 2 rounds of 10 steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="steps per round (rounded up to a multiple of 10)")
    ap.add_argument("--cases", default="cnn,mlp,mlp32")
    ap.add_argument("--cpu-time", action="store_true", help="time by process CPU time (with OMP_NUM_THREADS=1: "
                    "robust on a machine other jobs load; includes phasewatch's writer thread)")
    a = ap.parse_args(argv)
    if a.cpu_time:
        Runner.clock = staticmethod(time.process_time)
    if importlib.util.find_spec("cockpit") is None or importlib.util.find_spec("backpack") is None:
        print(f"vs_cockpit: needs Cockpit and BackPACK: {INSTALL}")
        return 0
    _shim_pkg_resources()
    rounds, steps, cases = (2, 10, ["cnn"]) if a.quick else (a.rounds, -(-a.steps // 10) * 10, a.cases.split(","))
    if a.quick:
        CASES["cnn"] = (*CASES["cnn"][:2], 16, CONFIGS)
    print(f"{torch.get_num_threads()} thread(s), {'process CPU' if a.cpu_time else 'wall'} time; {rounds} rounds x {steps} steps (Cockpit every step: "
          f"{1 if a.quick else 2} steps); cockpit-for-pytorch {importlib.metadata.version('cockpit-for-pytorch')}, "
          f"backpack-for-pytorch {importlib.metadata.version('backpack-for-pytorch')}, torch {torch.__version__}")
    print("ratios to plain training, median over rounds (min-max of the per-round ratios)")
    print("| model (P), batch | plain ms/step | " + " | ".join(CONFIGS[1:]) + " |")
    print("|---|---|" + "---|" * (len(CONFIGS) - 1))
    tmp = tempfile.mkdtemp(prefix="pw-vs-cockpit-")
    try:
        for key in cases:
            r = bench_case(key, rounds, steps, 1 if a.quick else 2, tmp)
            cells = [f"{r[c][0]:.2f} ({r[c][1]:.2f}–{r[c][2]:.2f})" if c in r else "—" for c in CONFIGS[1:]]
            print(f"| {r['name']} ({r['P'] / 1e3:,.0f}k), {r['batch']} | {r['plain_ms']:.1f} | " + " | ".join(cells)
                  + " |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
