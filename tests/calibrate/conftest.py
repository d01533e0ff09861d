"""Fixtures for calibration tests: private caches (never ~/.cache)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch ~/.cache: statistics and file digests go to the test's folder."""
    monkeypatch.setenv("QC_CALIB_CACHE", str(tmp_path / "calib-cache"))
    monkeypatch.setenv("QC_CACHE", str(tmp_path / "qc-cache"))
