"""The demo: record a small grokking run on modular addition, analyse it, write figures.

Model (Gromov, "Grokking modular arithmetic", arXiv:2301.02679, 2023): a two-layer network without
biases, ŷ = (x W)^{∘2} V, on x = one-hot(a) ⊕ one-hot(b), predicting (a + b) mod p.  MSE against
the zero-mean one-hot target, Adam with coupled L2 weight decay, full batch.  With p = 71, width
2048, 40 % of the pairs for training, lr 1e-3 and weight decay 2e-4, test accuracy jumps past 0.95
after ~100-150 steps, long after the training set is fitted; without weight decay it does not.

``x W`` for one-hot x is the sum of two rows of W, computed as a gather (the same function and
gradients as the dense product, ~70× cheaper on a CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("phasewatch")


class QuadraticMLP(torch.nn.Module):
    """ŷ = (x W)^{∘2} V on x = one-hot(a) ⊕ one-hot(b); no biases."""

    def __init__(self, p: int = 71, width: int = 2048, generator: torch.Generator | None = None,
                 init: str = "demo"):
        super().__init__()
        self.p = p
        # init="demo": h = W[a] + W[p+b] has variance 2·std²: std 1/(2√(2p)) keeps h² (and the
        # outputs) small at initialisation, the regime in which this model groks quickly.
        # init="fan_in": W ~ N(0, 1/fan_in) with fan_in = 2p (the author's note on this model)
        if init not in ("demo", "fan_in"):
            raise ValueError(f"init={init!r}: use 'demo' or 'fan_in'")
        w_std = 1 / (2 * (2 * p) ** 0.5) if init == "demo" else 1 / (2 * p) ** 0.5
        self.W = torch.nn.Parameter(torch.randn(2 * p, width, generator=generator) * w_std)
        self.V = torch.nn.Parameter(torch.randn(width, p, generator=generator) / width ** 0.5)

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        h = self.W[ab[:, 0]] + self.W[self.p + ab[:, 1]]  # = one-hot(a) ⊕ one-hot(b) @ W
        return (h * h) @ self.V


@dataclass
class GrokData:
    """The modular-addition data set: (a, b) pairs and their labels (a + b) mod p, split train/test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def modular_addition(p: int = 71, train_fraction: float = 0.4, seed: int = 0) -> GrokData:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    y = (x[:, 0] + x[:, 1]) % p
    perm = torch.randperm(p * p, generator=g)
    n = int(round(train_fraction * p * p))
    tr, te = perm[:n], perm[n:]
    return GrokData(x[tr], y[tr], x[te], y[te])


def train_grokking(
    out: str | Path | None,
    *,
    p: int = 71,
    width: int = 2048,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 2e-4,
    train_fraction: float = 0.4,
    seed: int = 0,
    eval_every: int = 2,
    recorder_kwargs: dict | None = None,
    progress: bool = False,
    controllers=None,
    grad_samples_every=None,
    grad_probe: int | tuple | None = None,
    init: str = "demo",
) -> dict:
    """Train the demo model, recording into ``out`` (None: no recorder).  Returns a small summary.

    ``grad_samples_every``: schedule of gradient-noise measurements (the recorder's), on per-example
    gradients of ``grad_probe``: an int n (the first n training pairs, 64 by default) or an
    ``(inputs, targets)`` pair.  ``controllers``: a callable ``optimizer -> [controller, ...]``
    (:mod:`phasewatch.record.control`) given to the recorder; training stops early when one says so
    (``stop_step`` in the summary).  Both need ``out``; without them nothing changes.  ``init``:
    the initialisation of :class:`QuadraticMLP` (``"demo"`` or ``"fan_in"``).
    """
    torch.manual_seed(seed)
    data = modular_addition(p, train_fraction, seed)
    model = QuadraticMLP(p, width, torch.Generator().manual_seed(seed + 1), init=init)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    target = torch.nn.functional.one_hot(data.train_y, p).float() - 1.0 / p

    rec = None
    if out is None and (controllers is not None or grad_samples_every is not None):
        from ..errors import PhasewatchError

        raise PhasewatchError("train_grokking: controllers and gradient samples need a recorder; pass out=DIR")
    if out is not None:
        from ..record.recorder import Recorder

        # full-batch training: B = the training set (for C_batch, p_batch and the Langevin variant)
        cfg = {"k": 32, "snapshot_every": None, "checkpoint_every": None, "batch_size": len(data.train_x)}
        if grad_samples_every is not None:
            probe = grad_probe if isinstance(grad_probe, tuple) else (
                data.train_x[: int(grad_probe or 64)], target[: int(grad_probe or 64)])
            cfg.update(grad_samples_every=grad_samples_every, grad_probe=probe,
                       grad_loss=lambda o, y: ((o - y) ** 2).sum(-1))  # the training loss, per example
        if controllers is not None:
            cfg["controllers"] = list(controllers(opt))
        cfg.update(recorder_kwargs or {})
        rec = Recorder(out, model, opt, seeds={"seed": seed},
                       meta={"task": f"modular addition mod {p}", "width": width,
                             "train_fraction": train_fraction, "weight_decay": weight_decay}, **cfg)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            tr = (model(data.train_x).argmax(1) == data.train_y).float().mean().item()
            te = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
        return tr, te

    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        if sys.stderr.isatty():
            bar = tqdm(total=steps, desc="training", file=sys.stderr, leave=False)
    grok_step = stop_step = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = ((model(data.train_x) - target) ** 2).sum(1).mean()
        loss.backward()
        if rec is not None:
            rec.loss(loss)
        opt.step()
        if step % eval_every == 0 or step == 1:
            tr, te = evaluate()
            if rec is not None:
                rec.log(step, train_acc=tr, test_acc=te)
            if grok_step is None and te >= 0.95:
                grok_step = step
        if bar is not None:
            bar.update(1)
        if rec is not None and rec.should_stop:
            stop_step = step
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if rec is not None:
        rec.close()
    tr, te = evaluate()
    summary = {"grok_step": grok_step, "final_train_acc": tr, "final_test_acc": te, "seconds": seconds,
               "n_params": sum(q.numel() for q in model.parameters())}
    if controllers is not None:
        summary["stop_step"] = stop_step
    return summary


def run_demo(out: str | Path, *, steps: int = 300, window: int = 10, weight_decay: float = 2e-4, seed: int = 0,
             control: bool = False, overwrite: bool = False, echo=print) -> Path:
    """``phasewatch demo``: train the grokking run (and with ``control`` the weight-decay-0 run) into
    ``out/<name>``, analyse each, and write ``<name>-analysis.csv/.json`` and the overview and noise
    figures (PDF and PNG) into ``out``; progress and the summaries go to ``echo``.  Returns ``out``.

    Gradient noise is measured from 64 per-example gradients every 10 steps (C, p with intervals;
    ~10 % of the training time).  An existing run directory is replaced only with ``overwrite``."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.pipeline import analyze
    from ..errors import PhasewatchError
    from ..plot import FIGURES, save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("grokking", weight_decay)]
    if control:
        runs.append(("control-no-wd", 0.0))
    for name, wd in runs:
        run_dir = out / name
        if run_dir.exists():
            if not overwrite:
                raise PhasewatchError(f"{run_dir}: exists; pass --overwrite or choose another --out")
            shutil.rmtree(run_dir)
        echo(f"training the {name} run (p=71, width 2048, weight decay {wd:g}, {steps} steps) ...", flush=True)
        r = train_grokking(run_dir, steps=steps, weight_decay=wd, seed=seed, progress=True,
                           grad_samples_every=10, grad_probe=64)
        grok = f"test accuracy >= 0.95 at step {r['grok_step']}" if r["grok_step"] else "never reached 0.95 test accuracy"
        echo(f"  {r['n_params']:,} parameters, {r['seconds']:.1f} s; {grok}; final test accuracy "
             f"{r['final_test_acc']:.3f}")
        res = analyze(run_dir, window=window)
        echo("\n".join("  " + line for line in res.summary().splitlines()))
        res.to_csv(out / f"{name}-analysis.csv")
        res.to_json(out / f"{name}-analysis.json")
        for kind in ("overview", "noise"):
            fig = FIGURES[kind](res)
            for f in ("pdf", "png"):
                save(fig, out / f"{name}-{kind}.{f}", f)
            plt.close(fig)
        echo(f"  wrote {out / f'{name}-overview.pdf'} and {name}-noise.pdf (and .png), "
             f"{name}-analysis.csv/.json")
    return out
