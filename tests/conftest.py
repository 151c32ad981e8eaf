"""Shared fixtures: a child-process environment for tests that run Python in a subprocess."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for ``sys.executable`` children: one BLAS/OpenMP thread (torch spins badly on
    busy 2-core machines otherwise), no user site, unbuffered output."""
    env = dict(os.environ)
    threads = os.environ.get("PHASEWATCH_TEST_THREADS", "1")
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
