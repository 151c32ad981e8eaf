"""The HF Trainer and Lightning callbacks under real DDP: 2 CPU processes, gloo, launched the way
users launch them (``torchrun`` for the Trainer, Lightning's own ``strategy="ddp"`` launcher for a
script).  Each DDP run is compared with the same training on one process with the global batch
(the data orders are made to match: rank r's micro-batch k plus the other rank's is the
single-process micro-batch k) and with brute force (each rank's gradient of each of its
micro-batches, computed on a fresh copy of the model).

Tolerances.  The models are float32; the DDP gradient is the average of two half-batch gradients
where the reference computes one full-batch gradient, so the two runs agree to float32 rounding.
Each number of a step is a sum of at most N terms along its longest chain (the examples or tokens
of the global batch, then the widths it passes through, forward and backward), so two evaluations
differ by at most ~γ_N = N·u/(1 − N·u) relative (Higham, Accuracy and Stability, §3.1; u = 2⁻²⁴);
to first order those differences add over the steps, and the trajectories stay within
``steps·γ_N`` (HF: N = 112 tokens + 16 + 64 + 32 = 224, 4 steps: 5.3e-5; Lightning: N = 16
examples + 6 + 16 + 3 = 41, 4 steps: 9.8e-6).  Band entries are products of two updates: twice
that, relative to the largest entry (off-diagonal entries may cancel to ~0).  Measured over the
4 steps: loss, gradient and update norms within 1.1e-7 relative, band entries within 5.5e-7.
The recorded loss and gradient norm against the
Trainer's own logged numbers: measured 6e-8, checked to 1e-6.  Per-rank samples are the very
gradients the brute force computes (same θ, same inputs, same kernels): their statistics agree to
1e-15, checked to 1e-9; micro-batch samples are differences of accumulated float32 gradients:
measured 4e-8, checked to 1e-6.

The workers import the model/data builders of this module (``sys.path``), so the two runs use the
same code; transformers and lightning are imported only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import phasewatch

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLED = [2, 3]  # steps with gradient samples
U32 = 2.0**-24  # unit roundoff of float32


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


HF_RTOL = 4 * _gamma(2 * 2 * 4 * 7 + 16 + 64 + 32)  # DDP vs one process, 4 steps (module docstring)
LIT_RTOL = 4 * _gamma(2 * 2 * 4 + 6 + 16 + 3)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


def _run(cmd: list[str], env: dict, timeout: float = 240) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-6000:]}"


def _stats_vs_brute_force(gs, row: int, samples: np.ndarray, names: list[str], sizes: dict[str, int],
                          groups: list[str], b: float, rtol: float) -> None:
    """The grad_samples row against the statistics of the brute-force samples (n, P), whose columns
    are the parameters ``names`` in order (sizes given); the run's groups are single tensors."""
    from phasewatch.analysis.noise import sufficient_statistics

    full = sufficient_statistics(samples, b=b)
    for col in ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth"):
        np.testing.assert_allclose(gs[col][row], getattr(full, col), rtol=rtol, err_msg=col)
    # the third moment is 0 for n = 2 (d_1 = -d_2): compare on its natural scale
    np.testing.assert_allclose(gs["third"][row], full.third, rtol=rtol, atol=1e-9 * full.trace ** 1.5)
    off = np.cumsum([0] + [sizes[n] for n in names])
    cols = {n: slice(off[i], off[i + 1]) for i, n in enumerate(names)}
    for li, g in enumerate(groups):
        part = samples[:, cols[g]]
        np.testing.assert_allclose(gs["layer_mean_sq_norm"][row, li], np.sum(part.mean(0) ** 2), rtol=rtol,
                                   atol=rtol * full.mean_sq_norm, err_msg=g)
        np.testing.assert_allclose(gs["layer_trace"][row, li], sufficient_statistics(part, b=b).trace,
                                   rtol=rtol, atol=rtol * full.trace, err_msg=g)
    n = len(samples)
    np.testing.assert_allclose(gs["sample_norms"][row, :n], np.linalg.norm(samples, axis=1), rtol=rtol)
    assert np.all(np.isnan(gs["sample_norms"][row, n:]))


# --------------------------------------------------------------------------------------------
# HuggingFace Trainer under torchrun
def hf_config():
    from transformers import GPT2Config

    # a causal LM: its loss honours num_items_in_batch, the Trainer's default path under DDP
    return GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def hf_trainer(out, per_device: int, callbacks: list, max_steps: int = 4, ddp: bool = False):
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    class Seqs(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randint(0, 32, (n, 8), generator=g)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            # label 0 is never a target (the loss shifts); -100 makes the Trainer count 7 tokens per
            # sequence whether or not it knows that the model's loss shifts (transformers 5.23 does
            # not for a model built from a config: it would count 8 and scale the loss by 7/8)
            return {"input_ids": self.x[i], "labels": torch.cat([torch.tensor([-100]), self.x[i, 1:]])}

    class InOrder(Trainer):
        # no shuffling: Accelerate deals batch j to rank j % 2, so the two ranks' k-th batches of 4
        # are the single process's k-th batch of 8
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config())
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, ddp_backend="gloo" if ddp else None, report_to=[], optim="sgd", learning_rate=0.5,
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=2, max_grad_norm=0.0, max_steps=max_steps, logging_steps=1,
        eval_strategy="steps", eval_steps=max_steps, save_strategy="no", disable_tqdm=True, seed=0)
    return InOrder(model=model, args=args, train_dataset=Seqs(64, 1), eval_dataset=Seqs(16, 2),
                   callbacks=callbacks)


HF_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    out = sys.argv[2]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    from transformers import GPT2LMHeadModel, TrainerCallback
    from test_integrations_ddp import SAMPLED, hf_config, hf_trainer
    from phasewatch.record.integrations.hf import PhasewatchCallback

    rank = int(os.environ["RANK"])
    bf = {}  # step -> this rank's brute-force gradient of each of its micro-batches

    class Step(TrainerCallback):
        step, enabled = 0, None
        def on_step_begin(self, args, state, control, **kw):
            Step.step = state.global_step + 1
        def on_step_end(self, args, state, control, **kw):  # while training: which recorders write
            if Step.enabled is None:
                Step.enabled = [per_rank.recorder.enabled, mb.recorder.enabled]

    def brute_force(module, args, kwargs):
        if not (module.training and torch.is_grad_enabled() and Step.step in SAMPLED):
            return
        ref = GPT2LMHeadModel(hf_config())
        ref.load_state_dict(module.state_dict())  # θ at the start of the step (no update in between)
        inputs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        params = [p for _, p in ref.named_parameters()]
        g = torch.autograd.grad(ref(**inputs).loss, params)  # the micro-batch's mean-loss gradient
        bf.setdefault(Step.step, []).append(torch.cat([x.reshape(-1) for x in g]).double().numpy())

    per_rank = PhasewatchCallback(out + "/run", k=3, block=2, strict=True, grad_samples_every=SAMPLED)
    mb = PhasewatchCallback(out + "/run-mb", k=3, block=2, strict=True, grad_samples_every=SAMPLED,
                            grad_source="micro_batch")
    trainer = hf_trainer(out + f"/hf-{rank}", per_device=4, callbacks=[Step(), per_rank, mb], ddp=True)
    trainer.model.register_forward_pre_hook(brute_force, with_kwargs=True)
    trainer.train()
    np.savez(f"{out}/bf-{rank}.npz", **{str(s): np.stack(v) for s, v in bf.items()})
    with open(f"{out}/rank-{rank}.json", "w") as f:
        json.dump({"log": trainer.state.log_history, "global_step": trainer.state.global_step,
                   "enabled": Step.enabled,
                   "names": [n for n, _ in trainer.model.named_parameters()],
                   "sizes": [p.numel() for _, p in trainer.model.named_parameters()]}, f)
    dist.barrier()
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort it (std::terminate, exit -6)
    sys.stdout.flush(); os._exit(0)
""")


def test_hf_trainer_under_torchrun(tmp_path, child_env):
    pytest.importorskip("transformers")
    from phasewatch.record.integrations.hf import PhasewatchCallback

    script = tmp_path / "hf_worker.py"
    script.write_text(HF_WORKER)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
          HERE, str(tmp_path)], child_env)
    # the reference: one process, batch 8 = both ranks' batches of 4
    ref_cb = PhasewatchCallback(tmp_path / "single", k=3, block=2, strict=True)
    ref_trainer = hf_trainer(tmp_path / "hf-single", per_device=8, callbacks=[ref_cb])
    ref_trainer.train()

    info = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert info[0]["enabled"] == [True, True] and info[1]["enabled"] == [False, False]  # rank 0 writes
    run, one = phasewatch.open_run(tmp_path / "run"), phasewatch.open_run(tmp_path / "single")
    assert sorted(os.listdir(tmp_path / "run")) == ["meta.json", "segment-000000.h5"]
    assert len(run.segments) == 1 and not run.warnings  # one writer
    assert run.meta["user"]["trainer"]["world_size"] == 2

    # steps: one per optimizer step, each of 2 micro-batches per rank
    assert info[0]["global_step"] == info[1]["global_step"] == 4
    assert run.steps["step"].tolist() == one.steps["step"].tolist() == [1, 2, 3, 4]
    bf = [np.load(tmp_path / f"bf-{r}.npz") for r in range(2)]
    assert all(z[str(s)].shape[0] == 2 for z in bf for s in SAMPLED)

    # loss: the mean over the ranks, which is the Trainer's logged loss and the global batch's loss
    logs = {h["step"]: h for h in info[0]["log"] if "loss" in h}
    np.testing.assert_allclose(run.steps["loss"], [logs[s]["loss"] for s in range(1, 5)], rtol=1e-6)
    np.testing.assert_allclose(run.steps["loss"], one.steps["loss"], rtol=HF_RTOL)
    np.testing.assert_array_equal(run.steps["lr"], one.steps["lr"])
    # the gradient after the all-reduce: the Trainer's norm, the single process's, and at the
    # sampled steps the norm of the mean of the 4 brute-force local gradients
    np.testing.assert_allclose(run.steps["grad_norm"], [logs[s]["grad_norm"] for s in range(1, 5)], rtol=1e-6)
    np.testing.assert_allclose(run.steps["grad_norm"], one.steps["grad_norm"], rtol=HF_RTOL)
    np.testing.assert_allclose(run.steps["layer_grad_norm"], one.steps["layer_grad_norm"], rtol=HF_RTOL,
                               atol=HF_RTOL * np.nanmax(one.steps["layer_grad_norm"]))
    samples = {s: np.concatenate([bf[0][str(s)], bf[1][str(s)]]) for s in SAMPLED}  # rank 0's, then rank 1's
    for s in SAMPLED:
        np.testing.assert_allclose(run.steps["grad_norm"][s - 1], np.linalg.norm(samples[s].mean(0)), rtol=1e-6)
    # the band: the all-reduced updates are the single process's
    b1 = one.band["band"]
    np.testing.assert_array_equal(np.isnan(run.band["band"]), np.isnan(b1))
    np.testing.assert_allclose(run.band["band"], b1, rtol=2 * HF_RTOL, atol=2 * HF_RTOL * np.nanmax(np.abs(b1)))
    np.testing.assert_allclose(run.steps["update_norm"], one.steps["update_norm"], rtol=HF_RTOL)

    # per-rank samples: n = 2 ranks x 2 micro-batches, b = per_device_train_batch_size
    names, sizes = info[0]["names"], dict(zip(info[0]["names"], info[0]["sizes"]))
    groups = [g["name"] for g in run.meta["model"]["groups"]]
    gs = run.table("grad_samples")
    assert run.meta["recorder"]["grad_samples_source"] == "per_rank"
    assert gs["step"].tolist() == SAMPLED and gs["n"].tolist() == [4, 4] and np.all(gs["b"] == 4)
    assert all(s == b"per_rank" for s in gs["source"])
    for row, s in enumerate(SAMPLED):
        _stats_vs_brute_force(gs, row, samples[s], names, sizes, groups, b=4, rtol=1e-9)
    # grad_source passed through: rank 0's own 2 micro-batches (the second callback's run)
    mb = phasewatch.open_run(tmp_path / "run-mb")
    gm = mb.table("grad_samples")
    assert gm["step"].tolist() == SAMPLED and gm["n"].tolist() == [2, 2] and np.all(gm["b"] == 4)
    assert all(s == b"micro_batch" for s in gm["source"])
    for row, s in enumerate(SAMPLED):
        _stats_vs_brute_force(gm, row, bf[0][str(s)], names, sizes, groups, b=4, rtol=1e-6)
    np.testing.assert_allclose(mb.steps["loss"], run.steps["loss"], rtol=1e-12)

    # evaluation: the Trainer's metrics (gathered over the ranks), at the recorder's step
    ev = [h for h in info[0]["log"] if "eval_loss" in h]
    steps, vals = run.metrics()["eval_loss"]
    assert steps.tolist() == [4] and len(ev) == 1
    np.testing.assert_allclose(vals, [ev[0]["eval_loss"]], rtol=1e-6)
    np.testing.assert_allclose(vals, one.metrics()["eval_loss"][1], rtol=HF_RTOL)


# --------------------------------------------------------------------------------------------
# Lightning, strategy="ddp" (its launcher re-runs the script for rank 1)
def lit_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def lit_data(batch: int, pre_batched: bool = False, rank: int | None = None):
    """64 training examples in batches of ``batch`` (no shuffling), 32 validation examples.  With
    ``pre_batched`` the dataset yields whole batches and the loader has no batch_size.  With
    ``rank``, the training loader holds that rank's examples of 2 (i ≡ rank mod 2), in order:
    Lightning's own distributed sampler would shuffle the training set."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    if pre_batched:
        chunks = list(zip(x[:64].split(batch), y[:64].split(batch)))
        train = torch.utils.data.DataLoader(chunks, batch_size=None)
    elif rank is not None:
        ds = torch.utils.data.TensorDataset(x[:64], y[:64])
        shard = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        train = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=shard)
    else:
        train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=batch)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[64:], y[64:]), batch_size=16)
    return train, val


def lit_module(sampled=()):
    """A LightningModule that keeps its training_step losses and, on the ``sampled`` steps, the
    brute-force gradient of each of its batches (on a fresh copy of the net at the step's θ)."""
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = lit_net()
            self.batch_losses: list[float] = []
            self.bf: dict[int, list[np.ndarray]] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            step = self.trainer.global_step + 1
            if step in sampled:
                ref = lit_net()
                ref.load_state_dict(self.net.state_dict())
                g = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), list(ref.parameters()))
                self.bf.setdefault(step, []).append(torch.cat([t.reshape(-1) for t in g]).double().numpy())
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.batch_losses.append(float(loss.detach()))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.5)

    return Net()


def lit_trainer(callbacks: list, **kw):
    import lightning.pytorch as pl

    kw = {"max_epochs": 1, **kw}
    return pl.Trainer(accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


LIT_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    out = sys.argv[2]
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    import lightning.pytorch as pl
    from test_integrations_ddp import SAMPLED, lit_data, lit_module, lit_trainer
    from phasewatch.record.integrations.lightning import PhasewatchCallback

    class Spy(pl.Callback):  # while training: does this rank's recorder write?
        enabled = None
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if Spy.enabled is None:
                Spy.enabled = cb.recorder.enabled

    # Lightning re-runs this script for rank 1 with LOCAL_RANK=1
    train, val = lit_data(batch=4, rank=int(os.environ.get("LOCAL_RANK", 0)))
    module = lit_module(SAMPLED)
    cb = PhasewatchCallback(out + "/run", k=3, block=2, strict=True, grad_samples_every=SAMPLED)
    trainer = lit_trainer([cb, Spy()], strategy="ddp", devices=2, use_distributed_sampler=False)
    trainer.fit(module, train, val)
    rank = trainer.global_rank
    np.savez(f"{out}/bf-{rank}.npz", **{str(s): np.stack(v) for s, v in module.bf.items()})
    with open(f"{out}/rank-{rank}.json", "w") as f:
        json.dump({"losses": module.batch_losses, "global_step": trainer.global_step,
                   "enabled": Spy.enabled, "world_size": trainer.world_size,
                   "val_loss": float(trainer.callback_metrics["val_loss"])}, f)
    dist.barrier()
    codes = [p.wait(timeout=120) for p in trainer.strategy.launcher.procs] if rank == 0 else []
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads occasionally abort it (std::terminate, exit -6)
    sys.stdout.flush(); os._exit(0 if all(c == 0 for c in codes) else 1)
""")


def test_lightning_ddp(tmp_path, child_env):
    pytest.importorskip("lightning.pytorch")
    from phasewatch.record.integrations.lightning import PhasewatchCallback

    script = tmp_path / "lit_worker.py"
    script.write_text(LIT_WORKER)
    _run([sys.executable, str(script), HERE, str(tmp_path)], child_env)
    # the reference: one process, batches of 8 = both ranks' batches of 4 (rank r has the examples
    # i ≡ r mod 2, in order); its micro-batch samples have b = 8
    train, val = lit_data(batch=8)
    ref_module = lit_module(SAMPLED)
    ref_cb = PhasewatchCallback(tmp_path / "single", k=3, block=2, strict=True, grad_samples_every=SAMPLED)
    lit_trainer([ref_cb], devices=1).fit(ref_module, train, val)

    info = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [i["world_size"] for i in info] == [2, 2] and [i["enabled"] for i in info] == [True, False]
    run, one = phasewatch.open_run(tmp_path / "run"), phasewatch.open_run(tmp_path / "single")
    assert sorted(os.listdir(tmp_path / "run")) == ["meta.json", "segment-000000.h5"]
    assert len(run.segments) == 1 and not run.warnings
    assert run.meta["user"]["trainer"]["world_size"] == 2

    # 8 batches of 4 per rank, 2 per step
    assert info[0]["global_step"] == info[1]["global_step"] == 4
    assert run.steps["step"].tolist() == one.steps["step"].tolist() == [1, 2, 3, 4]
    # loss: the mean of both ranks' training_step losses of the step = the global batch's loss
    both = np.array([i["losses"] for i in info])  # (rank, batch)
    np.testing.assert_allclose(run.steps["loss"], both.reshape(2, 4, 2).mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(run.steps["loss"], one.steps["loss"], rtol=LIT_RTOL)
    np.testing.assert_array_equal(run.steps["lr"], one.steps["lr"])
    bf = [np.load(tmp_path / f"bf-{r}.npz") for r in range(2)]
    samples = {s: np.concatenate([bf[0][str(s)], bf[1][str(s)]]) for s in SAMPLED}
    np.testing.assert_allclose(run.steps["grad_norm"], one.steps["grad_norm"], rtol=LIT_RTOL)
    for s in SAMPLED:
        np.testing.assert_allclose(run.steps["grad_norm"][s - 1], np.linalg.norm(samples[s].mean(0)), rtol=1e-6)
    b1 = one.band["band"]
    np.testing.assert_array_equal(np.isnan(run.band["band"]), np.isnan(b1))
    np.testing.assert_allclose(run.band["band"], b1, rtol=2 * LIT_RTOL, atol=2 * LIT_RTOL * np.nanmax(np.abs(b1)))
    np.testing.assert_allclose(run.steps["update_norm"], one.steps["update_norm"], rtol=LIT_RTOL)

    # per-rank samples, b filled from the (per-rank) dataloader's batch_size
    names = [n for n, _ in lit_module().named_parameters()]
    sizes = {n: p.numel() for n, p in lit_module().named_parameters()}
    groups = [g["name"] for g in run.meta["model"]["groups"]]
    gs = run.table("grad_samples")
    assert run.meta["recorder"]["grad_microbatch_size"] == 4
    assert gs["step"].tolist() == SAMPLED and gs["n"].tolist() == [4, 4] and np.all(gs["b"] == 4)
    assert all(s == b"per_rank" for s in gs["source"])
    for row, s in enumerate(SAMPLED):
        _stats_vs_brute_force(gs, row, samples[s], names, sizes, groups, b=4, rtol=1e-9)
    # the single process: its two batches of 8, b = 8
    g1 = one.table("grad_samples")
    assert g1["n"].tolist() == [2, 2] and np.all(g1["b"] == 8) and one.meta["recorder"]["grad_microbatch_size"] == 8
    for row, s in enumerate(SAMPLED):
        _stats_vs_brute_force(g1, row, np.stack(ref_module.bf[s]), names, sizes, groups, b=8, rtol=1e-6)

    # validation logged with sync_dist=True: the global value, at the end of the epoch
    steps, vals = run.metrics()["val_loss"]
    assert steps.tolist() == [4]
    np.testing.assert_allclose(vals, [info[0]["val_loss"]], rtol=1e-6)
    np.testing.assert_allclose(vals, one.metrics()["val_loss"][1], rtol=LIT_RTOL)


def test_lightning_microbatch_size_from_the_batch(tmp_path):
    """A loader without batch_size (a dataset of whole batches): b is the first batch's leading
    dimension; the recorder is then built at that batch, and still records the first step."""
    pytest.importorskip("lightning.pytorch")
    from phasewatch.record.integrations.lightning import PhasewatchCallback

    train, val = lit_data(batch=8, pre_batched=True)
    assert train.batch_size is None
    module = lit_module([1, 3])
    cb = PhasewatchCallback(tmp_path / "run", k=3, block=2, strict=True, grad_samples_every=[1, 3])
    lit_trainer([cb], devices=1).fit(module, train, val)
    run = phasewatch.open_run(tmp_path / "run")
    assert run.steps["step"].tolist() == [1, 2, 3, 4] and np.all(np.isfinite(run.steps["loss"]))
    assert run.meta["recorder"]["grad_microbatch_size"] == 8
    gs = run.table("grad_samples")
    assert gs["step"].tolist() == [1, 3] and np.all(gs["b"] == 8) and gs["n"].tolist() == [2, 2]
    names = [n for n, _ in module.named_parameters()]
    sizes = {n: p.numel() for n, p in module.named_parameters()}
    groups = [g["name"] for g in run.meta["model"]["groups"]]
    for row, s in enumerate([1, 3]):
        _stats_vs_brute_force(gs, row, np.stack(module.bf[s]), names, sizes, groups, b=8, rtol=1e-6)


def test_lightning_resume_from_checkpoint_continues_the_steps(tmp_path):
    """The recorder is built once Lightning has restored the checkpoint's global_step (on_train_start),
    so a run resumed from a checkpoint continues at step 5, not at 1 again."""
    pytest.importorskip("lightning.pytorch")
    from phasewatch.record.integrations.lightning import PhasewatchCallback

    train, val = lit_data(batch=8)
    first = lit_trainer([PhasewatchCallback(tmp_path / "run", k=3, block=2, strict=True)], devices=1)
    first.fit(lit_module(), train, val)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    module = lit_module()
    second = lit_trainer([PhasewatchCallback(tmp_path / "run", k=3, block=2, strict=True, resume=True)], devices=1,
                         max_epochs=2)
    second.fit(module, train, val, ckpt_path=tmp_path / "epoch1.ckpt")
    run = phasewatch.open_run(tmp_path / "run")
    assert second.global_step == 8
    assert run.steps["step"].tolist() == list(range(1, 9)) and len(run.segments) == 2
    assert np.all(np.isfinite(run.steps["loss"])) and run.metrics()["val_loss"][0].tolist() == [4, 8]
