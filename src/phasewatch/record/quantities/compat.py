"""Today's ``Recorder`` keyword arguments (``grad_*``, ``curvature_*``, ``snapshot_*`` ...) as quantities."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ...errors import RecorderError
from .base import Quantity
from .controllers import Controllers
from .curvature import Curvature
from .gradnoise import GradNoise
from .storage import Checkpoints, Snapshots

KINDS = (Snapshots, Checkpoints, GradNoise, Curvature, Controllers)


def from_kwargs(*, snapshot_every: Any = None, snapshot_kind: str = "raw", snapshot_dtype: str = "float64",
                checkpoint_every: Any = None, grad_samples_every: Any = None,
                grad_probe: tuple[Any, Any] | None = None,
                grad_loss: Callable[[Any, Any], torch.Tensor] | None = None, grad_samples_max: int = 64,
                grad_chunk: int | None = None, grad_probe_eval: bool = False,
                grad_microbatch_size: int | None = None, grad_microbatch_scale: str | float = "n_micro",
                grad_source: str | None = None, grad_mask: dict[str, Any] | None = None,
                grad_proj_dim: int | None = None, grad_proj: str = "coords", grad_proj_seed: int = 0,
                grad_method: str = "auto", curvature_every: Any = None, curvature_batch: Any = None,
                curvature_loss: Callable[[Any, Any], torch.Tensor] | None = None, curvature_topk: int = 1,
                curvature_tol: float = 1e-6, curvature_max_iter: int | None = None,
                curvature_trace: int | str | None = None, curvature_mode: str = "eval",
                curvature_hvp: str = "auto", curvature_groups: bool | list[str] = False,
                curvature_basis_device: str = "auto", curvature_basis_dtype: str = "float64",
                ntk_inputs: Any = None, ntk_outputs: str = "trace",
                ntk_method: str = "auto", controllers: Iterable[Any] | None = None,
                batch_size: int | None = None) -> dict[type, Quantity]:
    """The quantities of the recorder's keyword arguments (one of each kind, off where not asked).

    ``Recorder(path, model, opt, **options)`` passes its ``options`` here; each group of keywords
    builds one quantity (``snapshot_*`` :class:`Snapshots`, ``checkpoint_every`` :class:`Checkpoints`,
    ``grad_*`` :class:`GradNoise`, ``curvature_*``/``ntk_*`` :class:`Curvature`, ``controllers`` and
    ``batch_size`` :class:`Controllers`), which checks its own options; returned as
    ``{kind: quantity}`` for the five built-in kinds.

    Parameters
    ----------
    snapshot_every, snapshot_kind, snapshot_dtype: :class:`Snapshots` ``(every, kind, dtype)``, stored
        update vectors on that schedule (int N, ``"log"``, list of steps, callable).
    checkpoint_every: schedule of stored parameter vectors θ_t (float32 arrays, no pickle).
    grad_samples_every: schedule (int N, ``"log"``, list, callable) of gradient-noise measurements,
        stored as sufficient statistics in the ``grad_samples`` table (DEFINITIONS §2).  With
        ``grad_probe``: per-example gradients on that batch, after the step (on the new θ),
        source ``per_example``, b = 1.  Without: the micro-batch gradients of gradient
        accumulation of the scheduled step (on the θ the step starts from), source
        ``micro_batch``; needs ≥ 2 backward passes per step, else the step is skipped.
    grad_source: ``"per_example"``, ``"micro_batch"`` (the defaults above) or ``"per_rank"``: under
        DDP (a torch.distributed group of ≥ 2 ranks), every rank's local gradient of each of its
        micro-batches, before the all-reduce, n = ranks × micro-batches, b = the per-rank
        micro-batch size (see :mod:`phasewatch.record.distributed`).  ``per_rank`` runs
        collectives: build and close the recorder on every rank, with the same arguments.  The
        HF and Lightning callbacks choose it under DDP.
    grad_mask: ``{parameter name: bool or 0/1 tensor}``: gradient statistics of a pruned network
        over its unpruned coordinates only (each sample g becomes m ⊙ g; per-example and
        micro-batch samples, not ``per_rank``).  Tensors pruned with ``torch.nn.utils.prune``
        need no entry (the gradient of ``<name>_orig`` is already masked); either way the run's
        ``recorder.grad_mask`` metadata gives the density (see
        :func:`phasewatch.record.probes.gradient_masks`).  The update band and the steps table's
        gradient norm stay those of the parameters the optimizer moves: a pruned coordinate that
        receives no gradient does not move, but weight decay on ``<name>_orig`` does move it
        (towards 0, while the effective weight stays 0), and that motion is in the band.
    grad_probe: ``(inputs, targets)`` with examples along dim 0 (inputs may be a tuple of
        positional arguments); ``grad_loss(outputs, targets)`` returns per-example losses or
        their mean.  Computed with ``torch.func`` (``vmap(grad(functional_call))``), buffers passed
        through, ``grad_chunk`` examples at a time (default: all).  A model with BatchNorm in
        training mode is refused unless ``grad_probe_eval=True`` (the probe then runs in eval mode).
    grad_samples_max: stored per-sample norms and covariance eigenvalues (``cov_eigs``: the top
        eigenvalues of the samples' covariance, from the centred Gram) per row (64, NaN-padded);
        all samples enter the statistics.
    grad_proj_dim, grad_proj, grad_proj_seed: also store each measurement's samples projected to
        d = ``grad_proj_dim`` dimensions (off by default), centred, in the ``grad_proj`` table
        (first ``grad_samples_max`` samples; float32; plus the projected mean): ``"coords"`` (default)
        keeps d seeded random coordinates of the flattened parameter vector exactly (their indices
        in the run's ``recorder.grad_proj.index``), for coordinate-wise tail indices;
        ``"gaussian"`` a seeded Gaussian sketch R (d × P, N(0, 1/d) entries, generated per tensor
        and chunk, never materialised for large P).  Per-example and micro-batch samples only.
    grad_method: how per-example gradient Grams of a ``grad_probe`` are formed: ``"func"``
        explicit per-example gradients (torch.func); ``"ghost"`` from the layer inputs and output
        gradients of one ordinary backward, without per-example gradients (Linear, transformers
        Conv1D, Conv2d, Embedding, LayerNorm; refused if another parameter is sampled, or with
        ``grad_proj_dim``/``grad_mask``, which need the samples); ``"auto"`` (default) ghost for
        the covered parameters and torch.func for the rest (explicit with projection or masks).
        ``recorder.grad_method_used`` records which ran.  The ghost route runs the probe in one
        batch (``grad_chunk`` applies to the torch.func part).
    grad_microbatch_size: b of the micro-batch route (examples per micro-batch; NaN if None).
        Under FSDP2 give the per-rank micro-batch size: the samples are the reduce-scattered
        (all-ranks) micro-batch gradients, so the stored b is ``grad_microbatch_size`` × world size.
    grad_microbatch_scale: factor applied to each captured micro-batch gradient (the difference
        of p.grad between successive backward passes).  ``"n_micro"`` (default) multiplies by the
        number of micro-batches n, so a sample is the micro-batch *mean* gradient when the user
        divides each micro-batch loss by n (the usual convention); pass ``1.0`` if the losses are
        not divided.  Samples are captured at backward time: before clipping and, under a
        ``GradScaler``, still multiplied by the loss scale.
    curvature_every: schedule of curvature probes (DEFINITIONS §4–5), after the scheduled step, on
        the new θ: with ``curvature_batch=(inputs, targets)`` and ``curvature_loss(outputs,
        targets)`` → mean loss, the top ``curvature_topk`` Hessian eigenvalues by Lanczos to a
        residual ≤ ``curvature_tol``·|λ| (and the residuals and HVP count), the Hutchinson trace
        if ``curvature_trace`` (an int budget or ``"adaptive"``), Adam's preconditioned sharpness
        for Adam-type optimizers, and the optimizer's stability threshold; with ``ntk_inputs``, the
        NTK Gram on those inputs (``ntk_outputs`` ``"trace"``/``"full"``, ``ntk_method``
        ``"auto"``/``"jacobian"``/``"ntk_vp"``).  ``curvature_mode`` ``"eval"``/``"train"``.
        ``curvature_hvp``: ``"auto"`` (double backward, attention through the math SDPA backend;
        finite differences of gradients if that fails), ``"autograd"`` or ``"fd"``.  Each Hessian row
        also holds the curvature along the step's update, u_tᵀHu_t/u_tᵀu_t (when the recorder holds
        u_t exactly: no projected tensors, one step per update, one process).  ``curvature_groups``:
        True (every layer group) or a list of group names: λ_max of each group's diagonal Hessian
        block as well (columns ``group_lambda``/``group_residual``).
        ``curvature_basis_device``: where the Lanczos basis lives (``"auto"``, ``"cpu"``, a device;
        memory model in :func:`phasewatch.record.curvature.lanczos`); ``curvature_basis_dtype``
        ``"float64"`` (default) or ``"float32"`` (half the memory).  Under DDP build the recorder
        on every rank with that rank's share of the probe batch as ``curvature_batch``: the products
        are all-reduced (:mod:`phasewatch.record.curvature_ddp`), so the row is the one-process probe
        on the whole batch; rank 0 writes.  FSDP2: FD on the shards (:mod:`phasewatch.record.curvature_fsdp`).
    controllers, batch_size: :class:`Controllers` ``(controllers, batch_size=...)``,
        :mod:`phasewatch.record.control` controllers (off unless given) and the training batch size
        B for the ``C_batch``/``p_batch`` estimates (optional); when and how they run is described there.
    """
    snaps = Snapshots(snapshot_every, kind=snapshot_kind, dtype=snapshot_dtype)
    ctrl = Controllers(controllers, batch_size=batch_size)
    grad = GradNoise(grad_samples_every, probe=grad_probe, loss=grad_loss, samples_max=grad_samples_max,
                     chunk=grad_chunk, probe_eval=grad_probe_eval, microbatch_size=grad_microbatch_size,
                     microbatch_scale=grad_microbatch_scale, source=grad_source, mask=grad_mask,
                     proj_dim=grad_proj_dim, proj=grad_proj, proj_seed=grad_proj_seed,
                     method=grad_method)
    curv = Curvature(curvature_every, batch=curvature_batch, loss=curvature_loss, topk=curvature_topk,
                     tol=curvature_tol, max_iter=curvature_max_iter, trace=curvature_trace, mode=curvature_mode,
                     hvp=curvature_hvp, groups=curvature_groups, basis_device=curvature_basis_device,
                     basis_dtype=curvature_basis_dtype, ntk_inputs=ntk_inputs, ntk_outputs=ntk_outputs, ntk_method=ntk_method)
    return {Snapshots: snaps, Checkpoints: Checkpoints(checkpoint_every), GradNoise: grad, Curvature: curv,
            Controllers: ctrl}


def resolve(quantities: Iterable[Quantity] | None, legacy: dict[str, Any]) -> tuple[dict[type, Any], list]:
    """One quantity of each built-in kind (from ``quantities``, else from the keyword arguments
    ``legacy``) and the other :class:`Quantity` objects given, in their ``order``.  A kind given both
    ways is refused."""
    try:
        built = from_kwargs(**legacy)
    except TypeError as e:
        raise TypeError(str(e).replace("from_kwargs()", "Recorder()")) from None
    extra: list[Quantity] = []
    seen: set[type] = set()
    for q in quantities or []:
        kind = next((k for k in KINDS if isinstance(q, k)), None)
        if kind is None:
            if not isinstance(q, Quantity):
                raise RecorderError(f"quantities: {type(q).__name__} is not a phasewatch Quantity")
            extra.append(q)
            continue
        if kind in seen:
            raise RecorderError(f"quantities: two {kind.__name__} given; pass one of each kind")
        seen.add(kind)
        if built[kind].on:
            raise RecorderError(f"quantities: {kind.__name__} is given both as an object and as keyword "
                                "arguments; use one of the two")
        built[kind] = q
    return built, sorted(extra, key=lambda q: q.order)
