"""All fusions on the real SmolLM2-135M exports (with and without KV cache): counts, logits, tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcompiler.spec import linear_info
from tests.passes.fusion_util import ALL_FUSIONS, assert_same_decoder, count, run, runner

pytestmark = pytest.mark.slow

LAYERS = 30
IDS = (np.arange(48) * 997 + 13) % 20000 + 100


def _check_counts(fused) -> None:
    assert count(fused, "SimplifiedLayerNormalization") == 1  # the first norm reads the embedding
    assert count(fused, "com.microsoft.SkipSimplifiedLayerNormalization") == 2 * LAYERS
    assert count(fused, "com.microsoft.RotaryEmbedding") == 2 * LAYERS
    assert count(fused, "com.microsoft.GroupQueryAttention") == LAYERS
    assert count(fused, "Split") == 2 * LAYERS
    assert count(fused, "com.microsoft.QuickGelu") == LAYERS
    for op in ("Softmax", "Pow", "Neg", "Sigmoid"):
        assert count(fused, op) == 0


def test_kv_export_fused(smollm2_kv: Path, tmp_path: Path) -> None:
    fused = run(smollm2_kv, f"{ALL_FUSIONS},canonicalize")
    _check_counts(fused)
    nodes = sum(1 for n in fused.graph if n.op_type != "Constant")
    assert nodes < 20 * LAYERS  # from ~150 per layer
    roles = sorted({linear_info(n).role.value for n in fused.graph if linear_info(n) is not None})
    assert roles == ["down_proj", "gate_up_proj", "lm_head", "o_proj", "qkv_proj"]
    assert_same_decoder(runner(smollm2_kv, tmp_path, threads=2), runner(fused, tmp_path / "fused", threads=2), IDS,
                        steps=64)


def test_nokv_export_fused(smollm2_nokv: Path, tmp_path: Path) -> None:
    fused = run(smollm2_nokv, ALL_FUSIONS)
    _check_counts(fused)
    assert_same_decoder(runner(smollm2_nokv, tmp_path, threads=2), runner(fused, tmp_path / "fused", threads=2), IDS)


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-smooth", "w8a8-static-smooth", "w8a8-int8mix"])
def test_every_w8a8_recipe_fused(recipe: str, smollm2_kv: Path, calib_text: Path, tmp_path: Path) -> None:
    """Smoothed and static W8A8 graphs (MatMulIntegerToFloat before the fusions run) fuse like the float one."""
    import onnx

    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions, available_recipes

    calibrated = available_recipes()[recipe].needs_calibration
    # int8mix's outlier MatMuls may stay float on this little calibration (the coverage
    # contract's business, tested elsewhere): allow_partial lets the fusion counts be checked
    opts = (QuantizeOptions(calib=str(calib_text), calib_samples=4, seq_len=64, allow_partial=recipe == "w8a8-int8mix")
            if calibrated else QuantizeOptions())
    summary = quantize(smollm2_kv, tmp_path / "q", recipe=recipe, options=opts)
    fusion = summary["report"]["fusion"]
    assert (fusion["fuse-attention"], fusion["fuse-skip-rmsnorm"], fusion["fuse-rotary"]) == (LAYERS, 2 * LAYERS,
                                                                                              2 * LAYERS), fusion
    ops = [n.op_type for n in onnx.load(tmp_path / "q" / "model.onnx", load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS and ops.count("Softmax") == 0
