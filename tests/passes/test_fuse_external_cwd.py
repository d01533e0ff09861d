"""Fusions do not depend on the working directory: small initializers stored as external data are read from the
model's folder for ONNX Runtime's symbolic shape inference (which resolved them against the working directory,
failed, and fell back to ONNX's shape inference, under which attention and rotary no longer fused)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from tests.helpers import WINDOW, run_logits


def test_fused_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SyntheticConfig(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=192, kv_cache=True,
                          tie_embeddings=True)
    folder = build_model_dir(tmp_path / "m", cfg)[0]
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    small_external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                      and onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * int(np.prod(t.dims)) <= 1024]
    assert small_external  # what the symbolic tool tripped on
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the model's folder
    summary = quantize(folder, tmp_path / "out", recipe="w4a16-genai", options=QuantizeOptions())
    fusion = summary["report"]["fusion"]
    assert fusion["fuse-attention"] == cfg.layers and fusion["fuse-rotary"] == 2 * cfg.layers
    assert fusion["fuse-skip-rmsnorm"] == 2 * cfg.layers + 1
    # real numerics (ORT): the fused model's logits are the unfused one's.  Level 4 quantizes the activations to
    # int8 in the kernel, and a fused norm's last-bit differences move them by a step now and then; on this
    # synthetic model (whose int4 error is ~90% of the largest logit) that moves the logits by 2-3% with a
    # symmetric weight grid (genai's), 0.06% with an asymmetric one; at level 0 every grid agrees to 4e-6.
    unfused = tmp_path / "unfused"
    quantize(folder, unfused, recipe="w4a16-genai", options=QuantizeOptions(fuse=False))
    a, b = run_logits(unfused, WINDOW), run_logits(tmp_path / "out", WINDOW)
    assert np.abs(a - b).max() < 5e-2 * np.abs(a).max()
