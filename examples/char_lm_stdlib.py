"""A small GPT-style character-level language model on the Python standard library's own sources,
trained with AdamW or with Muon (on the hidden matrices, AdamW on the rest): claim 1's model
(``examples/claims/claim_01_optimizer_kstar.py`` loads this file).

    PYTHONPATH=src python examples/char_lm_stdlib.py runs/charlm muon   # one run, the claim's full size

The text is every ``*.py`` file at the top of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``), concatenated in sorted order: real text
already on the machine, nothing downloaded.  Bytes ≥ 128 map to token 0, so the vocabulary is the
128 ASCII codes.

Every run is recorded twice from the same training loop: one :class:`phasewatch.Recorder` with
``stride`` = the checkpoint spacing (the Gram of checkpoint displacements θ_t − θ_{t−stride}, the
thesis's measurement) and one with ``stride`` = 1 (per-step updates, judged against the momentum
null).  Both record the same parameters: the 2-D hidden matrices of the blocks (attention q/k/v and
output projections, MLP in/out), which are what Muon updates.  Under AdamW those matrices get an
AdamW of their own, so the recorded optimizer is the matrices' optimizer in both arms and the rest
(embeddings, LayerNorms, head) is trained by an identical AdamW in both.
"""

from __future__ import annotations

import math
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np

import phasewatch

VOCAB = 128


def corpus() -> tuple[np.ndarray, dict]:
    """The tokens (uint8, < 128) of the concatenated ``*.py`` files of the standard library and a
    description (directory, file count, bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.py files; this experiment trains on the standard library's sources")
    raw = b"\n".join(f.read_bytes() for f in files)
    tok = np.frombuffer(raw, dtype=np.uint8).copy()
    tok[tok >= VOCAB] = 0
    return tok, {"stdlib": str(root), "files": len(files), "bytes": int(tok.size)}


def build_model(cfg: dict):
    """Pre-LayerNorm GPT: token + position embeddings, ``layers`` blocks of causal self-attention
    (``heads`` heads) and a 4× GELU MLP, bias-free linear maps, final LayerNorm, untied head."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d, h, ctx = cfg["d_model"], cfg["heads"], cfg["context"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.proj = nn.Linear(d, d, bias=False)
            self.fc = nn.Linear(d, 4 * d, bias=False)
            self.out = nn.Linear(4 * d, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(VOCAB, d)
            self.pos = nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, VOCAB, bias=False)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln(x))

    return GPT()


def hidden_matrices(model) -> tuple[list, list]:
    """(hidden 2-D matrices of the blocks, everything else): Muon's and AdamW's parameters."""
    hid, rest = [], []
    for name, p in model.named_parameters():
        (hid if name.startswith("blocks.") and p.ndim == 2 else rest).append(p)
    return hid, rest


def optimizers(model, name: str, cfg: dict):
    """(optimizer of the hidden matrices, AdamW of the rest).  Both arms shrink the matrices by the
    same decoupled weight decay per step (lr·wd equal)."""
    import torch

    hid, rest = hidden_matrices(model)
    other = torch.optim.AdamW(rest, lr=cfg["adamw_lr"], betas=(0.9, 0.95), weight_decay=0.0)
    if name == "muon":
        mat = torch.optim.Muon(hid, lr=cfg["muon_lr"], momentum=0.95, nesterov=True,
                               weight_decay=cfg["decay_per_step"] / cfg["muon_lr"])
    elif name == "adamw":
        mat = torch.optim.AdamW(hid, lr=cfg["adamw_lr"], betas=(0.9, 0.95),
                                weight_decay=cfg["decay_per_step"] / cfg["adamw_lr"])
    else:
        raise ValueError(f"optimizer {name!r}: use 'muon' or 'adamw'")
    return mat, other


def _loss_on(model, tok, starts, ctx):
    import torch
    from torch.nn import functional as F

    idx = torch.as_tensor(np.stack([tok[s: s + ctx + 1] for s in starts]).astype(np.int64))
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def step_run(path: Path) -> Path:
    """The per-step (stride 1) run recorded beside the checkpoint-displacement run at ``path``."""
    return path.with_name(path.name + "-perstep")


def train(path: Path, optimizer: str, seed: int, cfg: dict) -> dict:
    """Train one run (``cfg``: model size, steps, batch, learning rates, ``stride``, ``k``) and record
    it at ``path`` (stride ``cfg["stride"]``) and at :func:`step_run` (stride 1).  Returns the
    summary: train/validation loss at the end, seconds, parameter counts."""
    import torch

    tok, _ = corpus()
    split = int(0.9 * tok.size)
    train_tok, val_tok = tok[:split], tok[split:]
    ctx, batch = cfg["context"], cfg["batch"]
    torch.manual_seed(seed)
    model = build_model(cfg)
    mat, other = optimizers(model, optimizer, cfg)
    warm = cfg["warmup"]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warm)) for o in (mat, other)]
    rng = np.random.default_rng(seed)
    val_starts = np.random.default_rng(10_000).integers(0, val_tok.size - ctx - 1, cfg["val_batches"] * batch)
    per = step_run(path)
    for p in (path, per):
        if p.exists():
            shutil.rmtree(p)
    meta = {"task": "char-level LM on the Python stdlib sources", "optimizer_name": optimizer, "model": cfg}
    t0 = time.perf_counter()
    with phasewatch.Recorder(path, model, mat, k=cfg["k"], stride=cfg["stride"], seeds={"seed": seed},
                             meta={**meta, "measurement": "checkpoint displacements"}) as rc, \
            phasewatch.Recorder(per, model, mat, k=cfg["k"], stride=1, seeds={"seed": seed},
                                meta={**meta, "measurement": "per-step updates"}) as rs:
        for step in range(1, cfg["steps"] + 1):
            starts = rng.integers(0, train_tok.size - ctx - 1, batch)
            loss = _loss_on(model, train_tok, starts, ctx)
            mat.zero_grad(set_to_none=True)
            other.zero_grad(set_to_none=True)
            loss.backward()
            rc.loss(loss)
            rs.loss(loss)
            other.step()
            mat.step()
            for s in scheds:
                s.step()
            if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
                with torch.no_grad():
                    val = float(np.mean([float(_loss_on(model, val_tok, val_starts[i * batch:(i + 1) * batch], ctx))
                                         for i in range(cfg["val_batches"])]))
                rc.log(step, val_loss=val)
                rs.log(step, val_loss=val)
    hid, rest = hidden_matrices(model)
    return {"final_train_loss": float(loss.detach()), "final_val_loss": val,
            "seconds": round(time.perf_counter() - t0, 1), "optimizer": optimizer,
            "recorded_params": int(sum(p.numel() for p in hid)),
            "total_params": int(sum(p.numel() for p in hid) + sum(p.numel() for p in rest)),
            "val_loss_uniform": math.log(VOCAB)}


#: claim 1's full-size configuration (see the claim script for the quick one)
DEFAULT = {"d_model": 64, "heads": 4, "layers": 3, "context": 64, "batch": 16, "steps": 2000, "warmup": 100,
           "adamw_lr": 2e-3, "muon_lr": 0.02, "decay_per_step": 2e-4, "stride": 100, "k": 12,
           "eval_every": 250, "val_batches": 8}

if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 3 or sys.argv[2] not in ("muon", "adamw"):
        sys.exit("usage: char_lm_stdlib.py RUN_DIR muon|adamw")
    print(json.dumps(train(Path(sys.argv[1]), sys.argv[2], 0, DEFAULT)))
