"""Calibration on the real SmolLM2-135M export (small windows; the 128×512 run is tools/compare_calibration.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcompiler.calibrate import StatRequest, linear_inputs
from qcompiler.irutil import load_model

from .refs import reference_activations
from .test_engine import assert_same, calibrator

pytestmark = pytest.mark.slow
OBS = ("minmax", "absmax_channel", "hessian")


def test_sweeps_with_hand_offs_on_the_real_graph(smollm2_kv: Path, calib_text: Path, tmp_path: Path) -> None:
    """Sweeps over groups of layers of an optimum export (KV cache, empty past) equal one sweep bitwise,
    and the last sweep's statistics (computed from hand-offs) equal numpy's on all activations."""
    model = load_model(smollm2_kv / "model.onnx")
    inputs = linear_inputs(model)
    assert len(inputs) == 4 * 30
    layers = {"layers.0.", "layers.14.", "layers.29."}
    requests = [StatRequest(v, OBS) for v, keys in inputs.items() if any(k.startswith(tuple(layers)) for k in keys)]
    one = calibrator(smollm2_kv, calib_text, tmp_path / "one", samples=2, seq_len=32)(model, requests)
    cal = calibrator(smollm2_kv, calib_text, tmp_path / "many", samples=2, seq_len=32,
                     max_memory=240 << 20, overhead_bytes=0)  # layer 29 down_proj input alone: ~230 MiB with the per-shard Hessian
    many = cal(model, requests)
    assert len(many.meta["groups"]) >= 3
    assert all(g["cut"] > 0 for g in many.meta["groups"][1:])
    assert_same(one, many, requests)
    last = requests[-1].value  # layer 29's down_proj input
    x = reference_activations(smollm2_kv / "model.onnx", [last], cal.windows.ids)[last]
    h = many.get(last, "hessian")
    xtx = x.T @ x
    assert np.linalg.norm(h.xtx - xtx) / np.linalg.norm(xtx) <= 1e-6
    assert np.array_equal(many.get(last, "absmax_channel"), np.abs(x).max(0).astype(np.float32))
