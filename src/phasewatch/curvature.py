"""Curvature and geometry probes (torch): public entry points.

    from phasewatch import curvature
    op = curvature.HessianOperator(model, loss_fn, (x, y), mode="eval")
    top = curvature.lanczos(op, op.n, k=3)                 # λ₁..λ₃ with residuals, HVP count
    tr = curvature.hutchinson_trace(op, op.n)              # adaptive budget, t-interval
    K = curvature.ntk_gram(model, x[:64])                  # empirical NTK Gram
    curvature.posthoc("runs/exp", model, (x, y), loss_fn)  # the same probes on stored checkpoints

Thresholds and the quantities built on them (S, η_opt, Φ, I, NTK ρ) are numpy functions in
:mod:`phasewatch.analysis.curvature`, re-exported here.
"""

from .analysis.curvature import (
    CriticalityConstants,
    Threshold,
    criticality,
    intelligence_coefficient,
    ntk_logdet,
    optimal_lr,
    stability_margin,
    stability_threshold,
)
from .record.curvature import (
    CurvatureProbe,
    EigenResult,
    FiniteDifferenceHessian,
    HessianOperator,
    NTKResult,
    TraceResult,
    adam_preconditioner,
    choose_ntk_method,
    double_differentiable_attention,
    hessian_operator,
    hutchinson_trace,
    lanczos,
    model_mode,
    ntk_gram,
    preconditioned_operator,
    update_curvature,
)
from .record.posthoc import load_theta, posthoc

__all__ = [
    "CriticalityConstants", "CurvatureProbe", "EigenResult", "FiniteDifferenceHessian", "HessianOperator",
    "NTKResult", "Threshold", "TraceResult", "adam_preconditioner", "choose_ntk_method", "criticality",
    "double_differentiable_attention", "hessian_operator", "hutchinson_trace",
    "intelligence_coefficient", "lanczos", "load_theta", "model_mode", "ntk_gram", "ntk_logdet", "optimal_lr",
    "posthoc", "preconditioned_operator", "stability_margin", "stability_threshold", "update_curvature",
]
