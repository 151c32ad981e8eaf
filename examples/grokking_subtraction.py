"""A second grokking task: modular subtraction learned by an MLP on learned embeddings.

    python examples/grokking_subtraction.py --out runs/sub               (~4 s of CPU; groks at step ~450-550)
    python examples/grokking_subtraction.py --out runs/sub-ctrl --weight-decay 0   (memorises, never groks)

Task: (a − b) mod p for a, b in 0..p−1, half of the p² pairs for training (p = 59).  Model: a one-layer
MLP on learned embeddings, ŷ = V relu(U [E_a ; E_b] + c) + d (embedding dimension 32, width 128),
trained full batch with cross-entropy and AdamW (lr 1e-2, decoupled weight decay 1.0).  The model,
loss and optimizer all differ from the demo's (``phasewatch.workflows.demo``: a quadratic network without
biases, MSE, Adam with coupled L2).  This is the modular-arithmetic MLP of the grokking literature
(Power et al. 2022, arXiv:2201.02177; Liu et al., "Omnigrok", arXiv:2210.01117, where weight decay
controls how late the model generalises), scaled down to run on a CPU in seconds: the training set
is fitted by step ~50, test accuracy stays near 0 until step ~250 and passes 0.95 at step ~450-550
with weight decay; without it test accuracy stays at 0 over the same steps.

:func:`train` records a run with :class:`phasewatch.Recorder` (the update band every step; training
and test accuracy every ``eval_every`` steps) and returns a small summary, like
``phasewatch.workflows.demo.train_grokking``; the claims experiment 2 imports it by file path.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

__all__ = ["EmbedMLP", "modular_subtraction", "train"]


class EmbedMLP(torch.nn.Module):
    """ŷ = V relu(U [E_a ; E_b] + c) + d: one shared embedding table, one hidden layer."""

    def __init__(self, p: int = 59, embed: int = 32, width: int = 128):
        super().__init__()
        self.embed = torch.nn.Embedding(p, embed)
        self.hidden = torch.nn.Linear(2 * embed, width)
        self.out = torch.nn.Linear(width, p)

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.embed(ab[:, 0]), self.embed(ab[:, 1])], dim=1)
        return self.out(torch.relu(self.hidden(e)))


def modular_subtraction(p: int = 59, train_fraction: float = 0.5, seed: int = 0):
    """``(train_x, train_y, test_x, test_y)``: all p² pairs (a, b) with label (a − b) mod p, split at random."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    y = (x[:, 0] - x[:, 1]) % p
    perm = torch.randperm(p * p, generator=g)
    n = int(round(train_fraction * p * p))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def train(
    out: str | Path | None,
    *,
    p: int = 59,
    train_fraction: float = 0.5,
    embed: int = 32,
    width: int = 128,
    steps: int = 800,
    lr: float = 1e-2,
    weight_decay: float = 1.0,
    seed: int = 0,
    eval_every: int = 5,
    recorder_kwargs: dict | None = None,
    threads: int | None = 1,
) -> dict:
    """Train one run, recording into ``out`` (None: no recorder).  Returns a summary:

    ``grok_step`` (first evaluation with test accuracy ≥ 0.95, None if never), ``fit_step`` (first
    evaluation with training accuracy ≥ 0.99), final accuracies, ``seconds`` (wall) and
    ``cpu_seconds`` (this process) of the loop, ``n_params``.  ``threads``: torch's intra-op threads
    during the loop (restored afterwards); one thread is the fastest for a model this small, above
    all on a loaded machine (None: leave torch's setting).
    """
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = modular_subtraction(p, train_fraction, seed)
    model = EmbedMLP(p, embed, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    rec = None
    if out is not None:
        from phasewatch import Recorder

        cfg = {"k": 32, "snapshot_every": None, "checkpoint_every": None, **(recorder_kwargs or {})}
        rec = Recorder(out, model, opt, seeds={"seed": seed},
                       meta={"task": f"modular subtraction mod {p}", "model": "embedding MLP",
                             "embed": embed, "width": width, "train_fraction": train_fraction,
                             "lr": lr, "weight_decay": weight_decay}, **cfg)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            tr = (model(train_x).argmax(1) == train_y).float().mean().item()
            te = (model(test_x).argmax(1) == test_y).float().mean().item()
        return tr, te

    grok_step = fit_step = None
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(train_x), train_y)
            loss.backward()
            if rec is not None:
                rec.loss(loss)
            opt.step()
            if step % eval_every == 0 or step == 1:
                tr, te = evaluate()
                if rec is not None:
                    rec.log(step, train_acc=tr, test_acc=te)
                if fit_step is None and tr >= 0.99:
                    fit_step = step
                if grok_step is None and te >= 0.95:
                    grok_step = step
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if rec is not None:
            rec.close()
        tr, te = evaluate()
    finally:
        torch.set_num_threads(before)
    return {"grok_step": grok_step, "fit_step": fit_step, "final_train_acc": tr, "final_test_acc": te,
            "seconds": seconds, "cpu_seconds": cpu, "n_params": sum(q.numel() for q in model.parameters())}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/grokking-sub59")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--weight-decay", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    summary = train(args.out, steps=args.steps, weight_decay=args.weight_decay, seed=args.seed)
    print(summary)
    import phasewatch

    print(phasewatch.analyze(args.out, window=10).summary())


if __name__ == "__main__":
    main()
