"""The error hierarchy: bad arguments raise InvalidArgumentError, which is both a PhasewatchError
(the command line prints it as one line) and a ValueError (callers catching ValueError keep working)."""

from __future__ import annotations

import numpy as np
import pytest

from phasewatch.errors import InvalidArgumentError, PhasewatchError
from phasewatch.plot.multirun import band_stats
from phasewatch.record.schedule import Schedule


def test_invalid_argument_is_both():
    assert issubclass(InvalidArgumentError, PhasewatchError)
    assert issubclass(InvalidArgumentError, ValueError)


@pytest.mark.parametrize("spec", [0, -3, "weekly"])
def test_schedule_bad_spec(spec):
    with pytest.raises(InvalidArgumentError, match="schedule"):
        Schedule(spec)


def test_band_stats_bad_band():
    s = np.arange(5.0)
    with pytest.raises(InvalidArgumentError, match="use sd, sem or minmax"):
        band_stats([(s, s), (s, s)], band="iqr")
    with pytest.raises(InvalidArgumentError, match="at least one series"):
        band_stats([])
