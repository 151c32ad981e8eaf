"""Record a grokking run on modular addition, analyse it and write the overview figure.

    python examples/grokking_modular.py --out runs/grok           (~30 s on 2 CPU cores)
    python examples/grokking_modular.py --out runs/ctrl --weight-decay 0   (the control: no grokking)

The training loop is plain PyTorch; the recorder is the one line marked below.
"""

from __future__ import annotations

import argparse

import torch

import phasewatch
from phasewatch.workflows.demo import QuadraticMLP, modular_addition


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/grokking-p71")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    p = 71
    torch.manual_seed(args.seed)
    data = modular_addition(p, train_fraction=0.4, seed=args.seed)
    model = QuadraticMLP(p, width=2048, generator=torch.Generator().manual_seed(args.seed + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=args.weight_decay)  # coupled L2
    target = torch.nn.functional.one_hot(data.train_y, p).float() - 1.0 / p  # zero-mean one-hot

    with phasewatch.Recorder(args.out, model, opt, k=32, seeds={"seed": args.seed}) as rec:  # <- the line
        for step in range(1, args.steps + 1):
            opt.zero_grad()
            loss = ((model(data.train_x) - target) ** 2).sum(1).mean()
            loss.backward()
            rec.loss(loss)
            opt.step()
            if step % 2 == 0:
                with torch.no_grad():
                    acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
                rec.log(step, test_acc=acc)

    res = phasewatch.analyze(args.out, window=10)
    print(res.summary())
    import matplotlib

    matplotlib.use("Agg")
    from phasewatch.plot import overview, save

    save(overview(res), f"{args.out}/overview.pdf")
    save(overview(res), f"{args.out}/overview.png")
    print(f"figures in {args.out}/overview.pdf and .png")


if __name__ == "__main__":
    main()
