"""Claim 1: the spectral gap position depends on the optimizer: Muon k* = 1, AdamW k* = 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import result, save_figure

CLAIM = "the gap position depends on the optimizer: Muon gives k* = 1, AdamW k* = 2 on the same model"
SOURCE = "Xu 2026 (arXiv:2603.28964), spectral-edge paper"


def _data(seed: int, n: int = 1024, d_in: int = 32, n_cls: int = 10):
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, 64), torch.nn.Tanh(), torch.nn.Linear(64, n_cls))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 2)
        y = teacher(x).argmax(1)
    return x, y


def train(path: Path, optimizer: str, seed: int, steps: int, batch: int = 128) -> dict:
    """A bias-free MLP 32-128-128-10 (every parameter 2-D, so Muon can take all of them) on a
    teacher-labelled Gaussian task, mini-batches of ``batch``, recorded with the Recorder."""
    import torch

    torch.manual_seed(seed)
    x, y = _data(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(128, 128, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10, bias=False))
    if optimizer == "muon":
        opt = torch.optim.Muon(model.parameters(), lr=0.02, weight_decay=0.01, momentum=0.95)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if path.exists():
        shutil.rmtree(path)
    g = torch.Generator().manual_seed(seed)
    with phasewatch.Recorder(path, model, opt, k=16, seeds={"seed": seed},
                             meta={"task": "teacher MLP", "optimizer_name": optimizer}) as rec:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            rec.loss(loss)
            opt.step()
            if step % 20 == 0:
                with torch.no_grad():
                    rec.log(step, train_acc=(model(x).argmax(1) == y).float().mean().item())
    return {"final_loss": float(loss.detach())}


def run(out_dir, quick: bool) -> dict:
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style

    out_dir = Path(out_dir)
    seeds = [0] if quick else [0, 1, 2]
    steps = 80 if quick else 250
    skip = 20  # leave out the first windows (initial transient)
    per = {"muon": [], "adamw": []}
    series = {}
    for opt in per:
        for seed in seeds:
            path = out_dir / "runs" / f"{opt}-seed{seed}"
            train(path, opt, seed, steps)
            an = phasewatch.analyze(path, window=10)
            t = an.table
            keep = t["valid"] & (t["step"] > skip)
            k = t["kstar"][keep]
            vals, counts = np.unique(k, return_counts=True)
            per[opt].append({"seed": seed, "kstar_mode": int(vals[np.argmax(counts)]),
                             "kstar_fractions": {int(v): float(c / k.size) for v, c in zip(vals, counts)},
                             "median_gap_ratio": float(np.nanmedian(t["gap_ratio"][keep]))})
            series[(opt, seed)] = (t["step"][keep], k, t["gap_ratio"][keep])

    with paper_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTHS["text"], 2.2), layout="constrained")
    kmax = 6
    width = 0.4
    for i, (opt, c) in enumerate((("muon", "C0"), ("adamw", "C1"))):
        ks = np.concatenate([series[(opt, s)][1] for s in seeds])
        frac = [np.mean(ks == j) for j in range(1, kmax + 1)]
        ax.bar(np.arange(1, kmax + 1) + (i - 0.5) * width, frac, width, color=c, label=opt)
        for s in seeds:
            st, _, gr = series[(opt, s)]
            bx.plot(st, gr, color=c, lw=0.6)
    ax.set(xlabel="k* (W = 10)", ylabel="fraction of windows")
    ax.legend(fontsize=6)
    bx.set(xlabel="step", ylabel="gap ratio σ_k*/σ_k*+1", yscale="log")
    fig_path = save_figure(fig, out_dir, "kstar_by_optimizer")

    mm = [r["kstar_mode"] for r in per["muon"]]
    am = [r["kstar_mode"] for r in per["adamw"]]
    desc = f"modal k* per seed: Muon {mm}, AdamW {am}"
    if all(m == 1 for m in mm) and all(m == 2 for m in am):
        verdict, why = "holds", desc
    elif set(mm) == set(am):
        verdict, why = "fails", desc + ": the same gap position under both optimizers"
    else:
        verdict, why = "fails", desc + ": positions differ, but not as 1 vs 2"
    if quick:
        why += " (quick mode: one seed, 80 steps)"
    setup = (f"bias-free MLP 32-128-128-10 (all parameters 2-D: Muon takes all of them) on a teacher-labelled "
             f"Gaussian task, batch 128, {steps} steps, seeds {seeds}; Muon lr 0.02 vs AdamW lr 1e-3 (both wd 0.01); "
             f"W = 10, windows after step {skip}")
    return result(CLAIM, SOURCE, setup, verdict, why, {"muon": per["muon"], "adamw": per["adamw"]}, fig_path)
