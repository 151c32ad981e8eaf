"""The docs' noise, NTK and criticality figures: a small run with every probe (about 20 s on a CPU).

    python examples/docs_figures.py [--out runs/docs-figures] [--img docs/figures/img]

A tanh MLP 20-64-64-4 fits 256 random labels by full-batch gradient descent with MSE at η = 0.5,
recording gradient noise (64 per-example gradients), Hessian λ_max and the NTK Gram on 16 fixed
inputs every 10 steps; the run's noise, ntk and criticality figures go to ``--img``.
"""

import argparse
from pathlib import Path

import matplotlib
import torch

import phasewatch
from phasewatch.plot import FIGURES, save

matplotlib.use("Agg")
ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/docs-figures")
ap.add_argument("--img", default="docs/figures/img")
ap.add_argument("--steps", type=int, default=400)
args = ap.parse_args()

torch.manual_seed(0)
x = torch.randn(256, 20)
y = torch.nn.functional.one_hot(torch.randint(0, 4, (256,)), 4).float()
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                            torch.nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.5)


def mse(out, target):
    return ((out - target) ** 2).sum(-1).mean()


with phasewatch.Recorder(args.out, model, opt, k=16, batch_size=len(x),
                         grad_samples_every=10, grad_probe=(x[:64], y[:64]),
                         grad_loss=lambda out, target: ((out - target) ** 2).sum(-1),
                         curvature_every=10, curvature_batch=(x, y), curvature_loss=mse,
                         ntk_inputs=x[:16]) as rec:
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        rec.loss(loss)
        opt.step()
        if step % 10 == 0:
            rec.log(step, train_acc=(model(x).argmax(1) == y.argmax(1)).float().mean().item())

res = phasewatch.analyze(args.out, window=10)
print(res.summary())
Path(args.img).mkdir(parents=True, exist_ok=True)
for name in ("noise", "ntk", "criticality"):
    path = save(FIGURES[name](res), Path(args.img) / f"{name}.png", dpi=110)
    print("wrote", path)
