"""Record a HuggingFace ``Trainer`` run with one callback, then analyse it.

    python examples/hf_trainer.py                     (~20 s on 2 CPU cores; nothing is downloaded)
    python examples/hf_trainer.py --out runs/hf-bert --steps 300
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py      (DDP: 2 CPU processes, gloo)

A 1-layer BERT built from a config learns a synthetic sequence task (is the first token in the
upper half of the vocabulary?) with gradient accumulation (2 micro-batches per step) and gradient
clipping.  The recorder sees one step per optimizer step, the clipped gradients the optimizer uses,
the Trainer's training loss and its evaluation metrics (eval_loss, eval_accuracy); every 10 steps
it measures gradient noise from the two micro-batches.

Under ``torchrun`` the same script trains with DDP (``ddp_backend="gloo"`` on CPU): every rank runs
the callback, rank 0 writes the run, the recorded gradient is the all-reduced one and the loss the
mean over the ranks, and the gradient noise comes from every rank's local micro-batch gradients,
captured before the all-reduce (source ``per_rank``, n = 2 ranks × 2 micro-batches, b = 16).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import phasewatch
from phasewatch.record.integrations.hf import PhasewatchCallback


class FirstTokenTask(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, vocab: int = 50, length: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, length), generator=g)
        self.y = (self.x[:, 0] >= vocab // 2).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    if args.out:
        out = args.out
    elif ddp:  # one path for every rank: torchrun gives them the same run id
        out = os.path.join(tempfile.gettempdir(), f"phasewatch-hf-{os.environ.get('TORCHELASTIC_RUN_ID', 'ddp')}", "run")
    else:
        out = tempfile.mkdtemp(prefix="phasewatch-hf-") + "/run"
    torch.set_num_threads(1)  # a tiny model: more threads only spin

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16))
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="phasewatch-hf-trainer-"), use_cpu=True, report_to=[],
        ddp_backend="gloo" if ddp else None,
        per_device_train_batch_size=16, gradient_accumulation_steps=2, max_grad_norm=1.0,
        learning_rate=3e-3, max_steps=args.steps, eval_strategy="steps", eval_steps=20, logging_steps=50,
        save_strategy="no", disable_tqdm=True, seed=0)

    def accuracy(p):
        return {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))}

    callback = PhasewatchCallback(out, k=16, grad_samples_every=10)  # <- the line
    trainer = Trainer(model=model, args=targs, train_dataset=FirstTokenTask(4096, 1),
                      eval_dataset=FirstTokenTask(256, 2), compute_metrics=accuracy, callbacks=[callback])
    trainer.train()
    if not trainer.is_world_process_zero():
        return

    print(f"\nrun: {out}")
    run = phasewatch.open_run(out)
    print(run.summary())
    print(phasewatch.analyze(run, window=8).summary())


if __name__ == "__main__":
    main()
