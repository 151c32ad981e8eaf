"""The ``>>>`` examples in the docstrings of the public estimators run and give their known answers.

Each example checks an estimator against a value known from arithmetic (Hill on exact Pareto
quantiles, C and B_simple on a three-sample measurement worked by hand, the two-batch estimator
on exact expectations, an exact logistic curve, the momentum null's Kac–Murdock–Szegő Gram,
gap positions and ‖ΔC‖_F on hand-built spectra and bands, the edge-of-stability thresholds) or a truth inside a statistical tolerance (the
stable index and McCulloch on Cauchy draws).  A module listed here with no example is an error:
the test asserts that examples were found and that none failed.
"""

import doctest
import importlib

import pytest

MODULES = (
    "phasewatch.analysis.hill",
    "phasewatch.analysis.hill_kernel",
    "phasewatch.analysis.stable_index",
    "phasewatch.analysis.mcculloch",
    "phasewatch.analysis.gradient_stats",
    "phasewatch.analysis.consolidation",
    "phasewatch.analysis.noise_scale",
    "phasewatch.analysis.phases",
    "phasewatch.analysis.nulls",
    "phasewatch.analysis.gram",
    "phasewatch.analysis.adiabatic",
    "phasewatch.analysis.curvature",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=True)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
