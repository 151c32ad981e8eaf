"""Argument checks shared by the estimators: one home, one exception type.

Every check raises :class:`phasewatch.errors.InvalidArgumentError`, which is both a
``PhasewatchError`` (the command line prints it as one line) and a ``ValueError`` (what
callers of a numerical function expect for a bad argument).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError

__all__ = ["rng", "check_level", "check_choice"]


def rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a seed (int), ``None`` (fresh OS entropy) or a Generator
    (returned as is, so that a caller's stream continues)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def check_level(level: float) -> float:
    """``level`` as a float in the open interval (0, 1), or a one-line error naming the fix."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"confidence level must be a number in (0, 1), got {level!r}") from None
    if not 0.0 < value < 1.0:
        raise InvalidArgumentError(f"confidence level must be in (0, 1), e.g. 0.95; got {value}")
    return value


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a one-line error listing them."""
    if value not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value
