"""A grokking task from the thesis's families: Dyck-1 (balanced parentheses) classification.

    python examples/grokking_dyck.py --out runs/dyck                 (groks with weight decay 1.0)
    python examples/grokking_dyck.py --out runs/dyck-ctrl --weight-decay 0

Task: sequences of ``length`` parentheses with as many ``(`` as ``)``; label 1 if balanced (every
prefix has at least as many ``(`` as ``)``), 0 otherwise; half of each class.  50 training
sequences, 1,000 held-out test sequences (disjoint from the training set).  Model: a 2-layer
transformer encoder (``torch.nn.TransformerEncoder``, batch_first, d_model 32, 4 heads, feed-forward
64, no dropout) on token + learned position embeddings, mean-pooled, a linear read-out to 2 classes.
Full batch, cross-entropy, AdamW lr 1e-3 (decoupled weight decay 1.0, or 0 for the controls).

The run is recorded on the attention matrices only (``in_proj_weight`` and ``out_proj.weight`` of
both layers): the attention parameters have their own AdamW instance with the same hyper-parameters
(AdamW is per-parameter, so two instances train exactly as one), and the Recorder records the
parameters of the optimizer it is given.  :func:`train` writes two recordings of the same run: the
checkpoint displacements every ``stride`` steps at ``out`` and the per-step updates at
:func:`step_run` (``out`` + ``-perstep``), plus training / test accuracy every ``eval_every`` steps.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["DyckTransformer", "dyck_data", "attention_matrices", "step_run", "train"]


class DyckTransformer(torch.nn.Module):
    """Token + position embeddings, a 2-layer TransformerEncoder, mean pooling, a linear read-out."""

    def __init__(self, length: int, d_model: int = 32, heads: int = 4, layers: int = 2, ff: int = 64):
        super().__init__()
        self.tok = torch.nn.Embedding(2, d_model)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(length, d_model))
        layer = torch.nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(d_model, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tok(x) + self.pos)
        return self.out(h.mean(dim=1))


def _balanced(seq: np.ndarray) -> bool:
    """Every prefix has at least as many '(' (0) as ')' (1), and the counts end equal."""
    depth = np.cumsum(np.where(seq == 0, 1, -1))
    return bool(np.all(depth >= 0) and depth[-1] == 0)


def dyck_data(length: int = 16, n_train: int = 50, n_test: int = 1000, seed: int = 0, negatives: str = "random"):
    """``(train_x, train_y, test_x, test_y)``: distinct sequences of ``length`` tokens (0 = '(',
    1 = ')'), half balanced (label 1) and half not (label 0); train and test disjoint.  ``negatives``:
    ``"random"`` (uniform sequences that are not balanced) or ``"equal"`` (equal counts of both
    parentheses, not balanced: the harder variant)."""
    from math import comb

    rng = np.random.default_rng(seed)
    want = (n_train + n_test) // 2
    catalan = comb(length, length // 2) // (length // 2 + 1)
    if length % 2 or catalan < want:
        raise ValueError(f"length {length}: {catalan} balanced sequences, {want} needed; use an even length "
                         "with Catalan(length/2) >= (n_train + n_test)/2")
    pos, neg, seen = [], [], set()
    base = np.array([0] * (length // 2) + [1] * (length // 2))
    while len(pos) < want or len(neg) < want:
        if len(pos) < want and rng.random() < 0.5:  # a random balanced sequence: a random Dyck walk
            s, o, c = [], 0, 0
            while len(s) < length:
                if o < length // 2 and (c == o or rng.random() < 0.5):
                    s.append(0)
                    o += 1
                else:
                    s.append(1)
                    c += 1
            seq = np.array(s)
        elif negatives == "equal":  # as many ')' as '(' but a prefix dips below zero
            seq = rng.permutation(base)
        else:  # any sequence of the length
            seq = rng.integers(0, 2, length)
        key = seq.tobytes()
        if key in seen:
            continue
        bal = _balanced(seq)
        bucket = pos if bal else neg
        if len(bucket) < want:
            bucket.append(seq)
            seen.add(key)
    x = np.stack(pos + neg)
    y = np.array([1] * want + [0] * want)
    perm = rng.permutation(len(y))
    x, y = torch.as_tensor(x[perm], dtype=torch.long), torch.as_tensor(y[perm], dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def attention_matrices(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``(attention, rest)``: the attention weight matrices (``self_attn`` in_proj / out_proj weights)
    and every other parameter."""
    att, rest = [], []
    for name, p in model.named_parameters():
        (att if "self_attn" in name and p.ndim == 2 else rest).append(p)
    return att, rest


def step_run(path: Path) -> Path:
    """The per-step (stride 1) recording beside the checkpoint-displacement recording at ``path``."""
    return Path(path).with_name(Path(path).name + "-perstep")


def train(out: str | Path, *, weight_decay: float = 1.0, seed: int = 0, length: int = 16, n_train: int = 50,
          n_test: int = 1000, negatives: str = "random", d_model: int = 32, heads: int = 4, ff: int = 64, steps: int = 3000,
          lr: float = 1e-3, stride: int = 100, k: int = 12, eval_every: int = 10, per_step: bool = True) -> dict:
    """Train and record one run (see the module docstring).  Returns ``grok_step`` (first evaluation
    with test accuracy ≥ 0.95, None if never), ``fit_step`` (training accuracy 1.0), final
    accuracies, ``seconds`` and parameter counts."""
    import phasewatch

    out = Path(out)
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = dyck_data(length, n_train, n_test, seed, negatives)
    model = DyckTransformer(length, d_model, heads, 2, ff)
    att, rest = attention_matrices(model)
    opt_att = torch.optim.AdamW(att, lr=lr, weight_decay=weight_decay)
    opt_rest = torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay)
    paths = [out] + ([step_run(out)] if per_step else [])
    for p in paths:
        if p.exists():
            shutil.rmtree(p)
    meta = {"task": f"Dyck-1 classification, length {length}", "model": "2-layer TransformerEncoder",
            "d_model": d_model, "recorded": "attention matrices", "lr": lr, "weight_decay": weight_decay}
    recs = [phasewatch.Recorder(p, model, opt_att, k=k, stride=s, seeds={"seed": seed}, meta=meta,
                                snapshot_every=None, checkpoint_every=None)
            for p, s in zip(paths, (stride, 1))]

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            tr = (model(train_x).argmax(1) == train_y).float().mean().item()
            te = (model(test_x).argmax(1) == test_y).float().mean().item()
        return tr, te

    grok_step = fit_step = None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        opt_att.zero_grad(set_to_none=True)
        opt_rest.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(train_x), train_y)
        loss.backward()
        for r in recs:
            r.loss(loss)
        opt_rest.step()
        opt_att.step()
        if step % eval_every == 0 or step == 1:
            tr, te = evaluate()
            for r in recs:
                r.log(step, train_acc=tr, test_acc=te)
            if fit_step is None and tr >= 1.0:
                fit_step = step
            if grok_step is None and te >= 0.95:
                grok_step = step
    for r in recs:
        r.close()
    tr, te = evaluate()
    return {"grok_step": grok_step, "fit_step": fit_step, "final_train_acc": tr, "final_test_acc": te,
            "seconds": round(time.perf_counter() - t0, 1), "recorded_params": sum(p.numel() for p in att),
            "total_params": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dyck")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--weight-decay", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(train(args.out, steps=args.steps, weight_decay=args.weight_decay, seed=args.seed))
