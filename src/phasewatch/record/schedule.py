"""When scheduled records (snapshots, checkpoints) happen."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from ..errors import InvalidArgumentError


class Schedule:
    """A set of steps: ``None`` (never), an int N (every N steps), ``"log"`` (≈10 per decade:
    1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, ...), an iterable of steps, or a callable step -> bool.
    """

    def __init__(self, spec: None | int | str | Iterable[int] | Callable[[int], bool]):
        self.spec = spec
        if spec is None:
            self._f: Callable[[int], bool] = lambda s: False
        elif isinstance(spec, bool):
            raise TypeError("schedule: pass an int, 'log', a list of steps or a callable, not a bool")
        elif isinstance(spec, int):
            if spec <= 0:
                raise InvalidArgumentError(f"schedule: every={spec} must be a positive number of steps")
            self._f = lambda s, n=spec: s % n == 0
        elif spec == "log":
            self._f = _log_spaced
        elif callable(spec):
            self._f = spec
        elif isinstance(spec, str):
            raise InvalidArgumentError(f"schedule: unknown spec {spec!r}; use an int, 'log', a list or a callable")
        else:
            steps = frozenset(int(s) for s in spec)
            self._f = steps.__contains__

    def __call__(self, step: int) -> bool:
        return bool(self._f(step))

    def describe(self) -> str | int | list | None:
        if self.spec is None or isinstance(self.spec, (int, str)):
            return self.spec
        if callable(self.spec):
            return getattr(self.spec, "__name__", "callable")
        return sorted(int(s) for s in self.spec)


def _log_spaced(step: int) -> bool:
    if step < 1:
        return False
    k = round(10 * math.log10(step))
    for kk in (k - 1, k, k + 1):
        if max(1, round(10 ** (kk / 10))) == step:
            return True
    return False
