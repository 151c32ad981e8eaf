"""Ghost Grams (record/ghost.py): per-example gradient Grams from one ordinary backward, against the
torch.func per-example gradients, per parameter and through the recorder's grad_samples rows.

Tolerance: both routes compute the same float64 sums in different orders; each Gram entry is a sum
of ≲ 10⁴ products (T² position pairs × features), so the relative difference is bounded by a few
hundred units of roundoff (u = 1.1e-16) times the condition of the centring (~10 here): 1e-10.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.errors import RecorderError
from phasewatch.record.ghost import ghost_grams, ghost_plan, unbatched_modules
from phasewatch.record.probes import gram_matrix_statistics, per_example_gradients

STATS = ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third")
TOL = 1e-10


class SeqMLP(torch.nn.Module):
    """Embedding -> Linear -> tanh -> LayerNorm -> Linear over T positions, plus a raw parameter
    (``scale``) that no covered module owns."""

    def __init__(self, vocab=7, d=5, h=6, out=3, raw=False):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=0)
        self.fc1 = torch.nn.Linear(d, h)
        self.ln = torch.nn.LayerNorm(h)
        self.fc2 = torch.nn.Linear(h, out)
        self.scale = torch.nn.Parameter(torch.ones(out)) if raw else None

    def forward(self, ids):
        z = self.fc2(self.ln(torch.tanh(self.fc1(self.emb(ids)))))
        z = self.fc2(torch.tanh(z @ torch.ones(z.shape[-1], self.fc2.in_features, dtype=z.dtype))) + z  # 2nd call
        return z * self.scale if self.scale is not None else z


def _seq_loss(out, y):  # per-example: mean over positions of squared error
    return ((out - y) ** 2).sum(-1).mean(-1)


def _mlp_data(n=9, T=4, vocab=7, out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    ids[0, :2] = 0  # padding positions get no embedding gradient
    y = torch.randn(n, T, out, generator=g, dtype=torch.float64)
    return ids, y


def _func_grams(model, names, inputs, targets, loss):
    return [(g.reshape(g.shape[0], -1) @ g.reshape(g.shape[0], -1).T)
            for g in per_example_gradients(model, names, inputs, targets, loss)]


def _check_per_param(model, inputs, targets, loss):
    names = [n for n, _ in model.named_parameters()]
    covered, fallback = ghost_plan(model, names)
    group = {n: i for i, n in enumerate(covered)}
    skipped, broadcast = unbatched_modules(model, covered, inputs)
    Ms, skipped2 = ghost_grams(model, covered, group, len(covered), inputs, targets, loss, broadcast)
    assert skipped2 == skipped
    fallback = fallback + skipped
    covered = {k: v for k, v in covered.items() if k not in skipped}
    Ms = Ms[[group[k] for k in covered]]
    ref = _func_grams(model, list(covered), inputs, targets, loss)
    for name, M, R in zip(covered, Ms, ref):
        scale = R.abs().max()
        assert scale > 0, name
        assert float((M - R).abs().max() / scale) < TOL, name
    return covered, fallback


def test_ghost_gram_equals_func_per_parameter_seq_mlp():
    torch.manual_seed(0)
    model = SeqMLP(raw=True).double()
    before = [p.grad for p in model.parameters()]
    covered, fallback = _check_per_param(model, *_mlp_data(), _seq_loss)
    assert fallback == ["scale"] and set(covered) == {n for n, _ in model.named_parameters()} - {"scale"}
    assert [p.grad for p in model.parameters()] == before  # .grad untouched


def test_ghost_gram_mean_loss_scaled_to_per_example():
    # a loss returning the batch mean (the documented grad_loss contract) gives the same Grams
    torch.manual_seed(1)
    model = SeqMLP().double()
    _check_per_param(model, *_mlp_data(seed=3), lambda o, y: ((o - y) ** 2).sum(-1).mean())


def _gpt2(tie):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  tie_word_embeddings=tie)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).double()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    return Logits()


def _lm_loss(logits, ids):  # next-token cross entropy, mean over the example's positions
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("tie", [False, True])
def test_ghost_gram_equals_func_per_parameter_gpt2(tie):
    model = _gpt2(tie)
    ids = torch.randint(0, 50, (6, 8), generator=torch.Generator().manual_seed(4))
    covered, fallback = _check_per_param(model, ids, ids, _lm_loss)
    # Conv1D attention/MLP weights, the tied wte/lm_head tensor (Embedding + Linear owners,
    # explicit per-example gradients summed) and the position embedding (called on (1, T)
    # position ids, broadcast over the batch: its output is expanded to n) are covered
    assert any(n.endswith("c_attn.weight") for n in covered)
    assert len(covered["lm.transformer.wte.weight"]) == (2 if tie else 1)
    assert fallback == []


def _record(tmp_path, name, model, probe, loss, method, steps=4, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = probe
    with phasewatch.Recorder(tmp_path / name, model, opt, k=4, block=2, strict=True, grad_samples_every=2,
                             grad_probe=probe, grad_loss=loss, grad_samples_max=16, grad_method=method,
                             **kw) as rec:
        for _ in range(steps):
            l_ = loss(model(x), y).mean()
            opt.zero_grad()
            l_.backward()
            rec.loss(l_)
            opt.step()
    meta = json.loads((tmp_path / name / "meta.json").read_text())["recorder"]
    return phasewatch.open_run(tmp_path / name).table("grad_samples"), meta


def _assert_rows_equal(a, b):
    assert a["step"].tolist() == b["step"].tolist() and len(a["step"]) >= 2
    assert a["n"].tolist() == b["n"].tolist()
    for k in STATS:
        np.testing.assert_allclose(a[k], b[k], rtol=TOL, atol=0, err_msg=k)
    for k in ("layer_mean_sq_norm", "layer_trace", "sample_norms", "cov_eigs"):
        fa, fb = np.isfinite(a[k]), np.isfinite(b[k])
        assert (fa == fb).all(), k
        scale = np.abs(b[k][fb]).max()
        assert np.abs(a[k][fa] - b[k][fb]).max() <= TOL * scale, k


@pytest.mark.parametrize("raw", [False, True])
def test_recorded_rows_ghost_equal_func_mlp(tmp_path, raw):
    torch.manual_seed(2)
    m1 = SeqMLP(raw=raw).double()
    m2 = SeqMLP(raw=raw).double()
    m2.load_state_dict(m1.state_dict())
    probe = _mlp_data(n=12, seed=5)
    tg, mg = _record(tmp_path, "g", m1, probe, _seq_loss, "auto", groups={"fc": ["fc1", "fc2"]})
    tf, mf = _record(tmp_path, "f", m2, probe, _seq_loss, "func", groups={"fc": ["fc1", "fc2"]})
    assert mg["grad_method_used"] == ("mixed" if raw else "ghost") and mf["grad_method_used"] == "func"
    assert mg["grad_method_fallback"] == (["scale"] if raw else [])
    _assert_rows_equal(tg, tf)


@pytest.mark.parametrize("tie", [False, True])
def test_recorded_rows_ghost_equal_func_gpt2(tmp_path, tie):
    m1, m2 = _gpt2(tie), _gpt2(tie)
    m2.load_state_dict(m1.state_dict())
    ids = torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(6))
    tg, mg = _record(tmp_path, "g", m1, (ids, ids), _lm_loss, "auto")
    tf, _ = _record(tmp_path, "f", m2, (ids, ids), _lm_loss, "func")
    assert mg["grad_method_used"] == "ghost" and mg["grad_method_fallback"] == []
    assert tg["layer_trace"].shape[1] > 1  # per layer as well as in total
    _assert_rows_equal(tg, tf)


def test_ghost_refusals_and_explicit_fallbacks(tmp_path):
    torch.manual_seed(3)
    model = SeqMLP(raw=True).double()
    probe = _mlp_data()
    with pytest.raises(RecorderError, match="scale is not owned by"):
        _record(tmp_path, "a", model, probe, _seq_loss, "ghost")
    with pytest.raises(RecorderError, match="cannot project or mask"):
        _record(tmp_path, "b", model, probe, _seq_loss, "ghost", grad_proj_dim=4)
    with pytest.raises(RecorderError, match="grad_method="):
        _record(tmp_path, "c", model, probe, _seq_loss, "fast")
    _, meta = _record(tmp_path, "d", model, probe, _seq_loss, "auto", grad_proj_dim=4)
    assert meta["grad_method_used"] == "func"  # projected samples need the explicit route


def test_ghost_gram_statistics_drop_nonfinite_example():
    # a non-finite example poisons its Gram row in both routes alike, and is dropped
    torch.manual_seed(4)
    model = SeqMLP().double()
    ids, y = _mlp_data(n=7)
    y[3, 0, 0] = float("nan")
    names = [n for n, _ in model.named_parameters()]
    covered, _ = ghost_plan(model, names)
    Ms, skipped = ghost_grams(model, covered, {n: 0 for n in covered}, 1, ids, y, _seq_loss)
    assert skipped == []
    ref = sum(_func_grams(model, names, ids, y, _seq_loss))
    st, sr = gram_matrix_statistics(Ms, 8), gram_matrix_statistics(ref[None], 8)
    assert st["n"] == sr["n"] == 6
    for k in STATS:
        assert abs(st[k] - sr[k]) <= TOL * abs(sr[k]), k


@pytest.mark.parametrize("T", [1, 40])
def test_ghost_and_explicit_forms_agree(T):
    # _dense_gram / _embedding_gram switch between the T×T ghost form and explicit per-example
    # gradients by cost; at T = 1 (ghost) and T = 40 (explicit) both equal the brute-force Gram
    from phasewatch.record.ghost import _dense_gram, _embedding_gram

    g = torch.Generator().manual_seed(T)
    n, p, q, V = 5, 3, 4, 6
    a = torch.randn(n, T, p, generator=g, dtype=torch.float64)
    d = torch.randn(n, T, q, generator=g, dtype=torch.float64)
    G = torch.einsum("ntq,ntp->nqp", d, a).reshape(n, -1)
    R = G @ G.T
    assert float((_dense_gram(a, d) - R).abs().max() / R.abs().max()) < TOL
    ids = torch.randint(0, V, (n, T), generator=g)
    E = torch.zeros(n, V, q, dtype=torch.float64)
    for i in range(n):
        for t in range(T):
            if ids[i, t] != 2:
                E[i, ids[i, t]] += d[i, t]
    E = E.reshape(n, -1)
    R = E @ E.T
    assert float((_embedding_gram(ids, d, V, 2) - R).abs().max() / R.abs().max()) < TOL


class Broadcast(torch.nn.Module):
    """A Linear run on a (1, d) buffer whose output is broadcast over the batch (``reduce=False``:
    expanding it to n changes nothing) or first summed over dim 0 (``reduce=True``: expanding it
    would multiply it by n, so it must fall back)."""

    def __init__(self, reduce, d=4, h=3):
        super().__init__()
        self.fc = torch.nn.Linear(d, h)
        self.side = torch.nn.Linear(d, h)
        self.register_buffer("c", torch.randn(1, d))
        self.reduce = reduce

    def forward(self, x):
        s = self.side(self.c)
        return torch.tanh(self.fc(x) + (s.sum(0) if self.reduce else s))


@pytest.mark.parametrize("reduce", [False, True])
def test_broadcast_module_expanded_only_when_output_unchanged(reduce):
    torch.manual_seed(5)
    model = Broadcast(reduce).double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    covered, fallback = _check_per_param(model, x, y, lambda o, t: ((o - t) ** 2).sum(-1))
    assert fallback == (["side.weight", "side.bias"] if reduce else [])


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = torch.nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2), padding=(0, 1))
        self.c3 = torch.nn.Conv2d(4, 4, 3, groups=2, padding=1)  # grouped: torch.func fallback
        self.fc = torch.nn.Linear(4 * 3 * 2, 3)

    def forward(self, x):
        z = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.tanh(self.c3(z)).flatten(1))


def _cnn_data(n=7, seed=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _ce(o, t):
    return torch.nn.functional.cross_entropy(o, t, reduction="none")


def test_ghost_gram_equals_func_per_parameter_cnn():
    torch.manual_seed(6)
    model = SmallCNN().double()
    covered, fallback = _check_per_param(model, *_cnn_data(), _ce)
    assert fallback == ["c3.weight", "c3.bias"] and "c2.weight" in covered


def test_recorded_rows_ghost_equal_func_cnn(tmp_path):
    torch.manual_seed(7)
    m1, m2 = SmallCNN().double(), SmallCNN().double()
    m2.load_state_dict(m1.state_dict())
    probe = _cnn_data(n=10, seed=9)
    tg, mg = _record(tmp_path, "g", m1, probe, _ce, "auto")
    tf, _ = _record(tmp_path, "f", m2, probe, _ce, "func")
    assert mg["grad_method_used"] == "mixed" and mg["grad_method_fallback"] == ["c3.weight", "c3.bias"]
    _assert_rows_equal(tg, tf)
