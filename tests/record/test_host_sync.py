"""Host synchronisations made by the recorder's own code, counted per optimizer step.

On a GPU every device→host read (``.item()``, ``.cpu()``, ``float(t)`` ...) waits for the queue of
kernels before it; one per step serialises training with the recorder.  The recorder promises
(DESIGN, brief): none on a step that does not end a block, and one device→host transfer per block,
at the drain; scheduled probes (gradient samples, snapshots, checkpoints, curvature) make their own,
on their scheduled steps only.

What is counted.  For the duration of a run, these are wrapped: ``Tensor.item``, ``.cpu``,
``.tolist``, ``.numpy``, ``__float__``, ``__int__``, ``__bool__``, ``.to(...)`` with a CPU target
(a string, a ``torch.device`` or a tensor on the CPU, positionally or as ``device=``) and
``torch.cuda.synchronize``.  A call is attributed to the first frame above it that is not torch's
own code (so ``np.asarray(t)`` → ``Tensor.__array__`` → ``.numpy()`` is the caller's); it is counted
when that frame's file is under ``src/phasewatch/record/``.  One refinement keeps the count a count
of *transfers*: ``.numpy()``/``.tolist()``/``.item()``, on the same line, of the tensor that a counted
``.cpu()``/``.to("cpu")`` returned (``t.cpu().numpy()``) reads host memory and is not a second
transfer (it is free on a GPU too); the same line is required because on a CPU-only machine
``t.cpu()`` returns ``t`` itself.  On a CPU-only machine every tensor is on the CPU, so ``.to(device)`` with the recorder's
own (CPU) device counts as well: conservative, a host→device copy is counted like a device→host one.

Each counted call gets a category from the recorder method on its stack (innermost first): the
drain, a snapshot, a checkpoint, a gradient-noise measurement (or its backward-time capture), a
curvature probe, the controllers; anything else is "other" and must never happen.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.record import recorder as recorder_mod

RECORD_DIR = str(Path(recorder_mod.__file__).resolve().parent) + os.sep
TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
HERE = str(Path(__file__).resolve())

CATEGORIES = {  # recorder method on the stack -> what it is
    "_drain": "drain", "_snapshot": "snapshot", "_checkpoint": "checkpoint",
    "_per_example_samples": "grad_samples", "_micro_batch_samples": "grad_samples",
    "_curvature_probe": "curvature", "_control": "control",
}
_TRANSFERS = ("cpu", "to")  # calls that move data to the host; the rest read a tensor's value


def _is_cpu(x) -> bool:
    if isinstance(x, str):
        return x.split(":")[0] == "cpu"
    if isinstance(x, torch.device):
        return x.type == "cpu"
    if isinstance(x, torch.Tensor):
        return x.device.type == "cpu"
    return False


class SyncCounter:
    """Wrap torch's host-reading methods and record (step, category, site, method) per call from
    files under ``root`` (see the module docstring).  ``step`` is whatever the loop set last."""

    def __init__(self, root: str = RECORD_DIR) -> None:
        self.root = root
        self.step: int | str = 0
        self.calls: list[tuple] = []
        self._host: dict[int, tuple] = {}  # id -> (host tensor a counted transfer returned, its site)
        self._saved: list[tuple] = []

    def _site(self, frame):
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back  # torch internals (Tensor.__array__, no_grad wrappers ...)
        if frame is None:
            return None
        fname = str(Path(frame.f_code.co_filename).resolve())
        if not fname.startswith(self.root) or fname == HERE and self.root == RECORD_DIR:
            return None
        cat, f = "other", frame
        while f is not None:
            if f.f_code.co_filename.startswith(RECORD_DIR) and f.f_code.co_name in CATEGORIES:
                cat = CATEGORIES[f.f_code.co_name]
                break
            f = f.f_back
        if cat == "other" and fname.endswith("probes.py"):
            cat = "grad_samples"  # the micro-batch capture's backward hooks
        return cat, f"{Path(fname).name}:{frame.f_lineno}:{frame.f_code.co_name}"

    def _wrap(self, owner, name, is_counted):
        orig = owner.__dict__.get(name, None)
        had = name in owner.__dict__
        fn = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if not is_counted(args, kwargs):
                return out
            site = counter._site(sys._getframe(1))
            if site is None:
                return out
            self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if name not in _TRANSFERS and self_t is not None \
                    and counter._host.get(id(self_t), (None, None))[1] == site[1]:
                return out  # reads the host tensor a transfer on this line returned: no second transfer
            counter.calls.append((counter.step, site[0], site[1], name))
            if name in _TRANSFERS and isinstance(out, torch.Tensor):
                counter._host[id(out)] = (out, site[1])  # (kept alive so that the id is not reused)
            return out

        self._saved.append((owner, name, had, orig))
        setattr(owner, name, wrapper)

    def __enter__(self) -> SyncCounter:
        always = lambda a, k: True  # noqa: E731
        for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"):
            self._wrap(torch.Tensor, name, always)

        def to_cpu(a, k):
            return any(_is_cpu(x) for x in a[1:]) or _is_cpu(k.get("device"))

        self._wrap(torch.Tensor, "to", to_cpu)
        self._wrap(torch.cuda, "synchronize", always)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, had, orig in reversed(self._saved):
            if had:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)
        self._saved = []
        self._host.clear()

    def set_step(self, step) -> None:
        self.step = step
        self._host.clear()

    def by_step(self) -> dict:
        out: dict = defaultdict(list)
        for step, cat, site, name in self.calls:
            out[step].append((cat, site, name))
        return out


# ------------------------------------------------------------------------------------------------
def test_counter_sees_each_kind_of_host_read_once():
    """The counter itself, on this file's own calls: each kind of read counted once, a read of the
    host tensor a transfer returned not counted again, torch's internals walked past."""
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    with SyncCounter(root=HERE) as c:
        c.set_step(1)
        t.sum().item()
        t.cpu().numpy()              # one transfer: .numpy() reads the host tensor .cpu() returned
        t.tolist()
        float(t[0, 1])
        int(t[1, 2])
        bool(t[0, 0] == 0)
        t.to("cpu")
        t.to(device=torch.device("cpu"))
        t.to(torch.float32)          # a dtype change only: not counted
        np.asarray(t)                # via Tensor.__array__ (torch's code) -> .numpy(), our line
        c.set_step(2)
        torch.stack([t, t]).sum()    # no host read
    names = [n for s, _, _, n in c.calls if s == 1]
    assert sorted(names) == sorted(["item", "cpu", "tolist", "__float__", "__int__", "__bool__",
                                    "to", "to", "numpy"])
    assert not [x for x in c.calls if x[0] == 2]
    assert all(site.startswith("test_host_sync.py:") for _, _, site, _ in c.calls)
    # restored afterwards: nothing counted, the methods are torch's again
    assert "item" not in torch.Tensor.__dict__ and torch.Tensor.to is torch._C.TensorBase.to


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))


def _run(tmp_path, *, steps=40, loss_after=False, micro=1, clip=True, lr_tensor=False, **kw):
    """Train the MLP for ``steps`` steps with a recorder, counting its host syncs per step.  With
    ``lr_tensor`` the learning rate is a tensor, changed in place every step (lr_s = 0.05/(1 + s/8))."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05) if lr_tensor else 0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(64, 12, generator=gen)
    ys = torch.randint(0, 5, (64,), generator=gen)
    lossf = torch.nn.functional.cross_entropy
    with SyncCounter() as c:
        c.set_step("init")
        rec = phasewatch.Recorder(tmp_path / "run", model, opt, strict=True, **kw)
        for s in range(1, steps + 1):
            c.set_step(s)  # everything until the next set_step belongs to optimizer step s
            idx = torch.arange((s * 16) % 64, (s * 16) % 64 + 16)
            for m in range(micro):
                part = idx[m::micro]
                loss = lossf(model(xs[part]), ys[part]) / micro
                loss.backward()
                if not loss_after:
                    rec.loss(loss)
            if clip:
                rec.unclipped_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            if lr_tensor:
                opt.param_groups[0]["lr"].fill_(0.05 / (1 + s / 8))
            opt.step()
            if loss_after:
                rec.loss(loss)
            opt.zero_grad()
        c.set_step("close")
        rec.close()
    run = phasewatch.open_run(tmp_path / "run")
    return c, rec, run


def _check(c, rec, steps, schedules):
    """The promise, step by step (see the module docstring)."""
    per = c.by_step()
    drains = {s for s in range(1, steps + 1) if s % (rec.block * rec.stride) == 0}
    assert drains, "the run must end at least one block"
    for s in range(1, steps + 1):
        calls = per.get(s, [])
        assert not [x for x in calls if x[0] == "other"], (s, calls)
        drain = [x for x in calls if x[0] == "drain"]
        if s in drains:
            # exactly one device->host transfer: band products, gradient norms, losses and the
            # pre-clip norms of the block travel together
            assert len(drain) == 1 and drain[0][2] in _TRANSFERS, (s, drain)
        else:
            assert not drain, (s, drain)
        for cat in ("snapshot", "checkpoint", "grad_samples", "curvature", "control"):
            mine = [x for x in calls if x[0] == cat]
            if mine:
                assert cat in schedules and schedules[cat](s), (s, cat, mine)
    for cat, sched in schedules.items():  # the scheduled probes did run (and were seen)
        on = [s for s in range(1, steps + 1) if sched(s)]
        if cat != "curvature":
            assert any(x[0] == cat for s in on for x in per.get(s, [])), cat
    closing = [x for x in per.get("close", []) if x[0] == "drain"]
    assert len(closing) <= 1, closing


@pytest.mark.parametrize("mode", ["exact", "projected"])
def test_plain_recorder_one_transfer_per_block(tmp_path, mode):
    steps = 40
    c, rec, run = _run(tmp_path, steps=steps, mode=mode, proj_dim=64)
    assert rec.mode == mode and (mode == "exact" or rec._folded)
    _check(c, rec, steps, {})
    # the run is complete and the values are those of the one transfer
    assert list(run.steps["step"]) == list(range(1, steps + 1))
    assert np.all(np.isfinite(run.steps["loss"])) and np.all(np.isfinite(run.steps["grad_norm_unclipped"]))
    assert len(run.band["step"]) == steps


def test_tensor_learning_rate_read_with_the_block(tmp_path):
    """A tensor lr (changed in place each step, as a scheduler does) is kept per step and read with
    the block's one transfer: the steps and band tables hold each step's own value."""
    steps = 32
    c, rec, run = _run(tmp_path, steps=steps, lr_tensor=True)
    _check(c, rec, steps, {})
    want = np.array([np.float32(0.05 / (1 + s / 8)) for s in range(1, steps + 1)], dtype=np.float64)
    np.testing.assert_array_equal(run.steps["lr"][:, 0], want)
    np.testing.assert_array_equal(run.band["lr"], want)


def test_loss_after_step_and_stride(tmp_path):
    """Losses given after optimizer.step() (the newest steps row is held back) and stride 2."""
    steps = 48
    c, rec, run = _run(tmp_path, steps=steps, loss_after=True, stride=2, block=8)
    _check(c, rec, steps, {})
    assert np.all(np.isfinite(run.steps["loss"]))


def test_scheduled_probes_sync_only_on_their_steps(tmp_path):
    gen = torch.Generator().manual_seed(3)
    probe = (torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen))
    kw = dict(grad_samples_every=5, grad_probe=probe,
              grad_loss=lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"),
              snapshot_every=7, checkpoint_every=11, curvature_every=13, curvature_batch=probe,
              curvature_loss=torch.nn.functional.cross_entropy, curvature_max_iter=5)
    steps = 40
    c, rec, run = _run(tmp_path, steps=steps, **kw)
    _check(c, rec, steps, {"grad_samples": rec.grad_samples, "snapshot": rec.snapshots,
                           "checkpoint": rec.checkpoints, "curvature": rec.curvature})
    assert len(run.table("grad_samples")["step"]) == 8


def test_micro_batch_samples_sync_only_on_their_steps(tmp_path):
    steps = 32
    c, rec, run = _run(tmp_path, steps=steps, micro=2, grad_samples_every=4, grad_microbatch_size=8)
    _check(c, rec, steps, {"grad_samples": rec.grad_samples})
    assert len(run.table("grad_samples")["step"]) == 8
