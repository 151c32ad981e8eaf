"""Edge of stability, recorded: full-batch gradient descent on a tanh MLP sharpens until λ_max
reaches 2/η and then hovers there (Cohen et al. 2021, arXiv:2103.00065).

A tanh MLP 64-200-200-10 on synthetic 10-class data (500 Gaussian inputs, random labels), MSE on one-hot targets, full-batch GD with η = 0.2, so 2/η = 10.  The recorder probes the
top Hessian eigenvalue by Lanczos on the full batch every few steps, and the NTK Gram on 16
inputs; the analysis gives the stability margin S = 2/η − λ_max.  Runs in well under a minute on
a CPU:

    python examples/edge_of_stability.py --out eos-out
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import phasewatch


def make_data(n: int = 500, d: int = 64, classes: int = 10, seed: int = 0):
    """Gaussian inputs with labels drawn at random: the network must memorise them, and fitting
    them sharpens the loss quickly (λ_max reaches 2/η = 10 after ~700 steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, torch.nn.functional.one_hot(y, classes).float()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 200), torch.nn.Tanh(), torch.nn.Linear(200, 200),
                               torch.nn.Tanh(), torch.nn.Linear(200, 10))


def mse(out, target):
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def train(out: Path, steps: int = 1000, lr: float = 0.2, probe_every: int = 25, seed: int = 0,
          checkpoint_every=None) -> Path:
    x, y = make_data(seed=seed)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    with phasewatch.Recorder(run, model, opt, curvature_every=probe_every, curvature_batch=(x, y),
                             curvature_loss=mse, curvature_topk=1, ntk_inputs=x[:16],
                             checkpoint_every=checkpoint_every, meta={"example": "edge_of_stability"}) as rec:
        for _ in range(steps):
            loss = mse(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.loss(loss)
            opt.step()
            if rec.step % 50 == 0:
                acc = (model(x).argmax(1) == y.argmax(1)).float().mean()
                rec.log(train_acc=acc)
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eos-out")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--probe-every", type=int, default=25)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = train(out, a.steps, a.lr, a.probe_every)
    t1 = time.perf_counter()
    res = phasewatch.analyze(run)
    cv = res.curvature
    print(f"trained and probed {a.steps} steps in {t1 - t0:.1f} s; 2/eta = {2 / a.lr:g}")
    for i in range(0, len(cv["step"]), max(1, len(cv["step"]) // 12)):
        # u_curvature: uᵀHu/uᵀu along the step's own update (one more product), at most lambda_max
        print(f"  step {int(cv['step'][i]):4d}  lambda_max {cv['lambda_max'][i]:7.3f}  "
              f"u_curvature {cv['u_curvature'][i]:7.3f}  S {cv['S'][i]:+7.3f}  residual {cv['lambda_residual'][i]:.1e}  HVPs {int(cv['hvps'][i])}  rho {cv['ntk_rho'][i]:8.2f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from phasewatch.plot import FIGURES, save

        if "sharpness" in FIGURES:
            import matplotlib.pyplot as plt

            fig = FIGURES["sharpness"](res)
            save(fig, out / "sharpness.pdf", "pdf")
            save(fig, out / "sharpness.png", "png")
            plt.close(fig)
            print(f"wrote {out / 'sharpness.pdf'} (and .png)")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
