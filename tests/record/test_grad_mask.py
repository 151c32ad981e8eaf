"""Gradient statistics of pruned networks: the recorder's ``grad_mask`` (and models pruned with
``torch.nn.utils.prune``) against brute-force per-example gradients, masked by hand."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import phasewatch
from phasewatch.analysis import noise
from phasewatch.errors import RecorderError
from phasewatch.record.probes import per_example_gradients

STATS = ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third")
N_PROBE = 11


def _ce(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def _masks(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.rand(model[0].weight.shape, generator=g) < 0.4,
            "2.weight": torch.rand(model[2].weight.shape, generator=g) < 0.6}


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(path, model, steps=4, lr=0.3, weight_decay=0.0, raw=None, **rec_kw):
    """SGD on fixed batches; returns {step: plain copy of the model after the step} (and fills
    ``raw[step]`` with the parameters themselves if ``raw`` is a dict)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    after = {}
    with phasewatch.Recorder(path, model, opt, k=4, block=2, strict=True, **rec_kw) as rec:
        for step in range(1, steps + 1):
            x, y = _data(16, 100 + step)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.loss(loss)
            opt.step()
            after[step] = _dense_copy(model)
            if raw is not None:
                raw[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return after


def _dense_copy(model):
    """A plain (unpruned) copy with the model's effective weights: ``<name>_orig ⊙ <name>_mask`` for
    pruned tensors (a pruned module cannot be deep-copied after a forward pass)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.endswith("_orig")]:
        sd[k.removesuffix("_orig")] = sd.pop(k) * sd.pop(k.removesuffix("_orig") + "_mask")
    m = _model()
    m.load_state_dict(sd)
    return m


def _brute_force(model, masks, x, y):
    """(n, P) per-example gradients of a plain model by one backward pass per example, masked by
    hand, in the order of ``named_parameters``."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i: i + 1]), y[i: i + 1]).backward()
        parts = []
        for name, p in model.named_parameters():
            g = p.grad.detach().clone()
            if name in masks:
                g = g * masks[name].to(g.dtype)
            parts.append(g.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows).numpy()


def _pruned_copy(model, masks):
    m = copy.deepcopy(model)
    for name, mask in masks.items():
        mod = m[int(name.split(".")[0])]
        prune.custom_from_mask(mod, "weight", mask)
    return m


def _rows(path):
    return phasewatch.open_run(path).table("grad_samples")


def test_explicit_mask_equals_brute_force(tmp_path):
    model = _model()
    masks = _masks(model)
    probe = _data(N_PROBE, 7)
    after = _train(tmp_path / "r", model, grad_samples_every=2, grad_probe=probe, grad_loss=_ce,
                   grad_mask=masks)
    t = _rows(tmp_path / "r")
    assert t["step"].tolist() == [2, 4]
    for row, step in enumerate(t["step"].tolist()):
        G = _brute_force(after[step], masks, *probe)
        ref = noise.sufficient_statistics(G)
        for k in STATS:
            assert t[k][row] == pytest.approx(getattr(ref, k), rel=1e-10, abs=1e-300), (step, k)
        np.testing.assert_allclose(t["sample_norms"][row, :N_PROBE], np.linalg.norm(G, axis=1), rtol=1e-10)
        g_bar = G.mean(0)
        T = ((G - g_bar) ** 2).sum() / (N_PROBE - 1)
        assert t["trace"][row] == pytest.approx(T, rel=1e-10)
        # C from the stored statistics is the canonical formula on the masked samples
        c = noise.consolidation_ratio(n=int(t["n"][row]), b=1.0, ci="none", **{k: float(t[k][row]) for k in STATS})
        assert c.C == pytest.approx(max(g_bar @ g_bar - T / N_PROBE, 0) / T, rel=1e-9)
        # the mask matters: unmasked statistics differ
        G_dense = _brute_force(after[step], {}, *probe)
        assert abs(noise.sufficient_statistics(G_dense).trace - T) > 1e-6 * T
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())["recorder"]["grad_mask"]
    n_keep = sum(int(m.sum()) for m in masks.values())
    n_params = sum(p.numel() for p in model.parameters())
    assert meta["source"] == "explicit" and meta["n_params"] == n_params
    assert meta["n_unmasked"] == n_keep + 6 + 3  # biases are not masked
    assert meta["density"] == pytest.approx((n_keep + 9) / n_params)
    assert meta["tensors"]["0.weight"] == pytest.approx(float(masks["0.weight"].double().mean()))


def test_prune_equals_explicit_mask(tmp_path):
    """torch.nn.utils.prune: the gradient of weight_orig is already masked, so the recorder gives the
    numbers of the explicit mask on a model whose pruned weights are held at zero."""
    base = _model(3)
    masks = _masks(base, 4)
    pruned = _pruned_copy(base, masks)
    dense = copy.deepcopy(base)
    with torch.no_grad():  # the same effective weights, held at zero by masking the gradient
        for name, m in masks.items():
            p = dense.get_parameter(name)
            p.mul_(m.to(p.dtype))
            p.register_hook(lambda g, m=m: g * m.to(g.dtype))
    probe = _data(N_PROBE, 9)
    kw = dict(grad_samples_every=1, grad_probe=probe, grad_loss=_ce)
    a_pr = _train(tmp_path / "pruned", pruned, **kw)
    _train(tmp_path / "explicit", dense, grad_mask=masks, **kw)
    tp, te = _rows(tmp_path / "pruned"), _rows(tmp_path / "explicit")
    assert tp["step"].tolist() == te["step"].tolist() == [1, 2, 3, 4]
    for k in STATS:
        np.testing.assert_allclose(tp[k], te[k], rtol=1e-10, err_msg=k)
    np.testing.assert_allclose(tp["sample_norms"][:, :N_PROBE], te["sample_norms"][:, :N_PROBE], rtol=1e-10)
    # per-layer statistics match by name (the pruned model lists bias before weight_orig)
    names_p = [p["name"].removesuffix("_orig") for p in phasewatch.open_run(tmp_path / "pruned").meta["model"]["params"]]
    names_e = [p["name"] for p in phasewatch.open_run(tmp_path / "explicit").meta["model"]["params"]]
    order = [names_p.index(n) for n in names_e]
    np.testing.assert_allclose(tp["layer_trace"][:, order], te["layer_trace"], rtol=1e-10)
    # and both are the brute force on the pruned model
    G = _brute_force(a_pr[4], masks, *probe)
    assert tp["trace"][-1] == pytest.approx(noise.sufficient_statistics(G).trace, rel=1e-10)
    meta_p = json.loads((tmp_path / "pruned" / "meta.json").read_text())["recorder"]["grad_mask"]
    meta_e = json.loads((tmp_path / "explicit" / "meta.json").read_text())["recorder"]["grad_mask"]
    assert meta_p["source"] == "torch.nn.utils.prune"
    assert meta_p["density"] == pytest.approx(meta_e["density"]) and meta_p["n_unmasked"] == meta_e["n_unmasked"]
    assert set(meta_p["tensors"]) == {"0.weight_orig", "2.weight_orig"}


def test_probe_keeps_the_pruned_attribute():
    """prune's forward pre-hook sets module.weight; per_example_gradients puts the real one back
    (inside functional_call it is a tensor of the torch.func transform)."""
    model = _pruned_copy(_model(2), _masks(_model(2), 3))
    x, y = _data(5, 1)
    model(x)
    w = model[0].weight
    names = [n for n, _ in model.named_parameters()]
    g = per_example_gradients(model, names, x, y, _ce)
    assert model[0].weight is w
    assert torch.all(g[names.index("0.weight_orig")][:, ~model[0].weight_mask.bool()] == 0)


def test_micro_batch_route_is_masked(tmp_path):
    model = _model(5)
    masks = _masks(model, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, block=2, strict=True, grad_samples_every=2,
                             grad_microbatch_scale=1.0, grad_mask=masks):
        for step in range(1, 5):
            before = copy.deepcopy(model)
            mbs = [_data(5, 10 * step + j) for j in range(3)]
            for x, y in mbs:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            seen[step] = (before, mbs)
    t = _rows(tmp_path / "r")
    assert t["step"].tolist() == [2, 4]
    for row, step in enumerate(t["step"].tolist()):
        before, mbs = seen[step]
        G = []
        for x, y in mbs:  # each micro-batch's mean gradient, masked
            before.zero_grad()
            torch.nn.functional.cross_entropy(before(x), y).backward()
            G.append(torch.cat([(p.grad * masks[n].to(p.dtype) if n in masks else p.grad).reshape(-1)
                                for n, p in before.named_parameters()]))
        ref = noise.sufficient_statistics(torch.stack(G).numpy())
        for k in STATS:
            assert t[k][row] == pytest.approx(getattr(ref, k), rel=1e-9), (step, k)


def test_band_with_pruning_and_weight_decay(tmp_path):
    """The band is the motion of the parameters the optimizer owns: without weight decay the pruned
    coordinates of weight_orig stay put; with it they decay (and that motion is in the band)."""
    base = _model(7)
    masks = _masks(base, 8)
    for wd in (0.0, 0.5):
        m = _pruned_copy(base, masks)
        w0 = m[0].weight_orig.detach().clone()
        raw = {}
        after = _train(tmp_path / f"wd{wd}", m, steps=2, weight_decay=wd, raw=raw)
        off = ~masks["0.weight"]
        moved = (m[0].weight_orig.detach() - w0)[off]
        if wd == 0:
            assert torch.all(moved == 0)
        else:
            torch.testing.assert_close(moved, w0[off] * ((1 - 0.3 * wd) ** 2 - 1))
        assert torch.all(after[2][0].weight[off] == 0)  # the effective weight stays 0
        band = phasewatch.open_run(tmp_path / f"wd{wd}").table("band")["band"]
        u2 = sum(((raw[2][n] - raw[1][n]) ** 2).sum().item() for n in raw[2])
        assert band[-1, 0] == pytest.approx(u2, rel=1e-12)


def test_bad_masks_are_refused(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = _data(4, 0)
    kw = dict(grad_samples_every=1, grad_probe=probe, grad_loss=_ce)
    with pytest.raises(RecorderError, match="not a recorded parameter"):
        phasewatch.Recorder(tmp_path / "a", model, opt, grad_mask={"weight": torch.ones(6, 4)}, **kw)
    with pytest.raises(RecorderError, match="shape"):
        phasewatch.Recorder(tmp_path / "b", model, opt, grad_mask={"0.weight": torch.ones(4, 6)}, **kw)
    with pytest.raises(RecorderError, match="0/1"):
        phasewatch.Recorder(tmp_path / "c", model, opt, grad_mask={"0.weight": torch.full((6, 4), 0.5)}, **kw)
    # no mask and no pruning: nothing in the metadata
    with phasewatch.Recorder(tmp_path / "d", model, opt, **kw):
        pass
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["recorder"]["grad_mask"] is None
