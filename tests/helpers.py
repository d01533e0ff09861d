"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import save_model
from qcompiler.runtime import DecoderRunner, make_session


def run_logits(model: ir.Model | Path, ids: np.ndarray, tmp: Path | None = None, optimize: bool = True) -> np.ndarray:
    """Logits of a model (folder or in-memory IR model saved to ``tmp``) on one window."""
    if isinstance(model, ir.Model):
        assert tmp is not None
        tmp.mkdir(parents=True, exist_ok=True)
        save_model(model, tmp / "model.onnx")
        model = tmp
    return DecoderRunner(make_session(model, optimize=optimize)).logits(ids)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = np.sum((ref - test.astype(np.float64)) ** 2)
    return float(10 * np.log10(np.sum(ref**2) / max(noise, 1e-30)))


def rel_err(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.abs(ref - test).max() / max(np.abs(ref).max(), 1e-30))


WINDOW = (np.arange(48) * 37 + 11) % 256
