"""HuggingFace Trainer and Lightning callbacks on real tiny models built from configs (nothing
downloaded): one recorded step per optimizer step under gradient accumulation, the band equal to the
inner products of the actual parameter updates, the gradients after clipping, losses and evaluation
metrics equal to the frameworks' own numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import phasewatch

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (two spin badly on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


def _check_band(run, thetas: list[np.ndarray]) -> None:
    """band[t][j] = <u_t, u_{t-j}> with u_t = θ_t − θ_{t−1} from the saved parameter states.

    The recorder subtracts in the parameters' dtype (float32 here), exact except where an entry's
    update is not small against it: agreement to float32 rounding (1e-6), not to float64's."""
    u = np.diff(np.stack(thetas), axis=0)  # (T, P), row t-1 is u_t
    band = run.band["band"]
    assert run.band["step"].tolist() == list(range(1, len(u) + 1))
    K = band.shape[1]
    for t in range(len(u)):
        for j in range(K):
            if t - j < 0:
                assert np.isnan(band[t, j])
            else:
                np.testing.assert_allclose(band[t, j], u[t] @ u[t - j], rtol=1e-6, atol=1e-7 * band[t, 0])
    np.testing.assert_allclose(run.steps["update_norm"], np.linalg.norm(u, axis=1), rtol=1e-6)


def _flat(params) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params]).numpy()


# --------------------------------------------------------------------------------------------
# HuggingFace
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 50, (n, 8), generator=g)
        self.y = (self.x[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _hf_trainer(tmp_path, callback, max_steps=6, **kw):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    model = BertForSequenceClassification(cfg)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=0.05, max_steps=max_steps, logging_steps=1,
        save_strategy="no", eval_strategy="steps", eval_steps=3, learning_rate=1e-2,
        disable_tqdm=True, seed=0, **kw)

    def accuracy(p):
        return {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))}

    return Trainer(model=model, args=args, train_dataset=_Tokens(64, 1), eval_dataset=_Tokens(16, 2),
                   compute_metrics=accuracy, callbacks=[callback])


class _States(transformers.TrainerCallback):
    """Ground truth: the trainable parameters, in float64, before training and after every step."""

    def __init__(self) -> None:
        self.thetas: list[np.ndarray] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.thetas.append(_flat(self.params))

    def on_step_end(self, args, state, control, **kw):
        self.thetas.append(_flat(self.params))


def test_hf_trainer_callback(tmp_path):
    from phasewatch.record.integrations.hf import PhasewatchCallback

    cb = PhasewatchCallback(tmp_path / "run", k=4, block=2, strict=True, grad_samples_every=2)
    states = _States()
    trainer = _hf_trainer(tmp_path, cb)
    trainer.add_callback(states)
    trainer.train()
    run = phasewatch.open_run(tmp_path / "run")
    # one recorded step per optimizer step (2 micro-batches each), none lost at the end
    assert trainer.state.global_step == 6
    assert run.steps["step"].tolist() == list(range(1, 7))
    _check_band(run, states.thetas)
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h}
    hf_norm = np.array([logs[s]["grad_norm"] for s in range(1, 7)])  # the Trainer's pre-clipping norm
    assert np.all(hf_norm > 0.05)  # every step clipped
    # the recorder sees what the optimizer sees: the clipped gradient (clip_grad_norm_ scales by max/(norm+1e-6))
    np.testing.assert_allclose(run.steps["grad_norm"], 0.05 * hf_norm / (hf_norm + 1e-6), rtol=1e-5)
    # ... and the norm before clipping is the Trainer's logged one, taken from on_log (the same float)
    np.testing.assert_array_equal(run.steps["grad_norm_unclipped"], hf_norm)
    # the step's loss is the Trainer's logged training loss
    np.testing.assert_allclose(run.steps["loss"], [logs[s]["loss"] for s in range(1, 7)], rtol=1e-6)
    # evaluation metrics at the steps of evaluation, equal to the Trainer's
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_loss" in h}
    for name in ("eval_loss", "eval_accuracy"):
        steps, vals = run.metrics()[name]
        assert steps.tolist() == [3, 6]
        np.testing.assert_allclose(vals, [evals[3][name], evals[6][name]], rtol=1e-6)
    assert "eval_runtime" not in run.metrics() and "epoch" not in run.metrics()
    # micro-batch samples: n = 2 per step, b = the per-device batch; their mean is the gradient
    # before clipping (the Trainer's logged norm)
    gs = run.table("grad_samples")
    assert gs["step"].tolist() == [2, 4, 6] and gs["n"].tolist() == [2, 2, 2] and np.all(gs["b"] == 4)
    np.testing.assert_allclose(gs["mean_sq_norm"], hf_norm[[1, 3, 5]] ** 2, rtol=1e-5)
    assert run.meta["user"]["trainer"]["gradient_accumulation_steps"] == 2


def test_hf_callback_finds_the_optimizer_at_the_first_step(tmp_path):
    """Trainer versions that pass no optimizer to on_train_begin: found at the first step, which is
    still recorded in full."""
    from phasewatch.record.integrations.hf import PhasewatchCallback

    class NoOptimizerGiven(PhasewatchCallback):
        def on_train_begin(self, args, state, control, **kw):
            kw["optimizer"] = None
            return super().on_train_begin(args, state, control, **kw)

    cb = NoOptimizerGiven(tmp_path / "run", k=3, block=2, strict=True)
    states = _States()
    trainer = _hf_trainer(tmp_path, cb, max_steps=3)
    trainer.add_callback(states)
    trainer.train()
    run = phasewatch.open_run(tmp_path / "run")
    assert run.steps["step"].tolist() == [1, 2, 3]
    assert np.all(np.isfinite(run.steps["grad_norm"])) and np.all(np.isfinite(run.steps["loss"]))
    assert run.meta["optimizer"]["class"] == "AdamW"
    _check_band(run, states.thetas)
    assert cb._discover_handle is None  # the global hook is gone


# --------------------------------------------------------------------------------------------
# Lightning
class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.batch_losses: list[float] = []
        self.pre_clip_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.batch_losses.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):  # after the closure's backward, before clipping
        self.pre_clip_norms.append(float(torch.linalg.vector_norm(
            torch.cat([p.grad.reshape(-1) for p in self.parameters()]))))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.5)


class _LStates(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.params = list(pl_module.parameters())
        self.thetas = [_flat(self.params)]
        trainer.optimizers[0].register_step_post_hook(lambda *a: self.thetas.append(_flat(self.params)))


def test_lightning_callback(tmp_path):
    from phasewatch.record.integrations.lightning import PhasewatchCallback

    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=8)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[64:], y[64:]), batch_size=16)
    cb = PhasewatchCallback(tmp_path / "run", k=4, block=2, strict=True, grad_samples_every=[2, 5])
    states = _LStates()
    module = _Module()
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.5, accelerator="cpu",
                         devices=1, enable_checkpointing=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[states, cb])
    trainer.fit(module, train, val)
    run = phasewatch.open_run(tmp_path / "run")
    assert trainer.global_step == 8  # 8 batches per epoch, 2 per step, 2 epochs
    assert run.steps["step"].tolist() == list(range(1, 9))
    _check_band(run, states.thetas)
    # the optimizer's (clipped) gradient: the pre-step work runs after Lightning's closure
    pre = np.array(module.pre_clip_norms)
    assert np.any(pre > 0.5)
    np.testing.assert_allclose(run.steps["grad_norm"], np.where(pre > 0.5, 0.5 * pre / (pre + 1e-6), pre), rtol=1e-5)
    # the norm before clipping, from on_before_optimizer_step: the same float32 sum of squares in
    # another order (foreach norms, then their norm), so equal to a few float32 ulps times log2(P)
    np.testing.assert_allclose(run.steps["grad_norm_unclipped"], pre, rtol=1e-5)
    # the step's loss: the mean of its two training_step losses
    np.testing.assert_allclose(run.steps["loss"], np.array(module.batch_losses).reshape(8, 2).mean(1), rtol=1e-6)
    # validation at the end of each epoch (not the sanity check), at the recorder's step
    steps, vals = run.metrics()["val_acc"]
    assert steps.tolist() == [4, 8] and np.all((vals >= 0) & (vals <= 1))
    assert run.metrics()["val_loss"][0].tolist() == [4, 8]
    np.testing.assert_allclose(run.metrics()["val_loss"][1][-1], float(trainer.callback_metrics["val_loss"]), rtol=1e-6)
    # micro-batch samples through the closure: the mean is the gradient before clipping
    gs = run.table("grad_samples")
    assert gs["step"].tolist() == [2, 5] and gs["n"].tolist() == [2, 2]
    np.testing.assert_allclose(gs["mean_sq_norm"], pre[[1, 4]] ** 2, rtol=1e-5)
