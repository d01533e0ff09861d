"""Fixtures of the op-library tests: the CPU library, built once (reused if up to date)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcompiler.ops import build_library


@pytest.fixture(scope="session")
def ops_lib() -> Path:
    """The CPU op library in its default location (built under a file lock if missing/stale)."""
    return build_library(cuda=False).cpu_library
