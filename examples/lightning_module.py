"""Record a Lightning run with one callback, then analyse it.

    python examples/lightning_module.py               (~15 s on 2 CPU cores)
    python examples/lightning_module.py --out runs/lit --epochs 20
    python examples/lightning_module.py --ddp         (DDP: Lightning launches a 2nd CPU process)

A small MLP classifies points of a synthetic 3-class problem; ``accumulate_grad_batches=2`` and
``gradient_clip_val`` are on.  Lightning runs the last micro-batch's backward and the clipping
inside ``optimizer.step(closure)``; the recorder does its pre-step work when that closure returns,
so it records the clipped gradient the optimizer uses.  Validation metrics (``val_loss``,
``val_acc``) are logged into the run after each validation.

With ``--ddp``, ``Trainer(strategy="ddp", accelerator="cpu", devices=2)``: Lightning runs this
script again as rank 1 (gloo on CPU); both ranks run the callback, rank 0 writes the run.  The
recorded gradient is the all-reduced one, the loss the mean over the ranks, and the gradient noise
comes from every rank's local micro-batch gradients (source ``per_rank``: n = 2 ranks × 2
micro-batches, b = 32, the per-rank batch size, filled in from the dataloader).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import lightning.pytorch as pl
import torch

import phasewatch
from phasewatch.record.integrations.lightning import PhasewatchCallback


class Classifier(pl.LightningModule):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                       torch.nn.ReLU(), torch.nn.Linear(width, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(out, y), sync_dist=True)  # global under DDP
        self.log("val_acc", (out.argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 3, generator=torch.Generator().manual_seed(99))
    y = (torch.tanh(x @ w) + 0.3 * torch.randn(n, 3, generator=g)).argmax(-1)
    return torch.utils.data.TensorDataset(x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--ddp", action="store_true", help="2 processes (strategy='ddp', gloo on CPU)")
    args = ap.parse_args()
    # rank 1 is this script run again by Lightning, with rank 0's environment: one path for both
    out = args.out or os.environ.get("PHASEWATCH_EXAMPLE_RUN") or tempfile.mkdtemp(prefix="phasewatch-lightning-") + "/run"
    os.environ["PHASEWATCH_EXAMPLE_RUN"] = out
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)

    train = torch.utils.data.DataLoader(data(2048, 1), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(data(512, 2), batch_size=256)
    # gradient noise every 10 steps from the micro-batches of 32 examples (b = 32, the loader's
    # batch size: C per example known)
    callback = PhasewatchCallback(out, k=16, grad_samples_every=10)  # <- the line
    trainer = pl.Trainer(max_epochs=args.epochs, accumulate_grad_batches=2, gradient_clip_val=1.0,
                         accelerator="cpu", devices=2 if args.ddp else 1, strategy="ddp" if args.ddp else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(Classifier(), train, val)
    if not trainer.is_global_zero:
        return

    print(f"\nrun: {out}  ({trainer.global_step} optimizer steps)")
    run = phasewatch.open_run(out)
    print(run.summary())
    print(phasewatch.analyze(run, window=8).summary())


if __name__ == "__main__":
    main()
