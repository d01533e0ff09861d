"""The fusions on already-lowered graphs: ``MatMulNBits`` (w4a16-rtn) and ``MatMulIntegerToFloat`` (w8a8-dynamic).

A SmolLM2-shaped synthetic decoder (9 query heads over 3 KV heads, head size 64, KV cache) is
quantized and lowered for the cpu target first, then fused: every layer's attention must become
``GroupQueryAttention``, q/k ``RotaryEmbedding``, and the norms and SiLU fuse as on the float graph
(skip-norms, ``QuickGelu``); the greedy tokens equal those of the lowered, unfused graph and the logits
agree (ORT; :data:`TOL`).
The W8A8 lowering's per-token scales (``ReduceMax`` with its axes as an input) used to stop the
shape inference, which left every fusion after it without shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import ALL_FUSIONS, WINDOW, assert_same_decoder, count, run, runner, synthetic

CFG = SyntheticConfig(layers=2, hidden=576, heads=9, kv_heads=3, intermediate=256, vocab=256, kv_cache=True)
LOWERED = {
    "w4a16-rtn": "canonicalize,quantize-weights{bits=4,group_size=32},lower-matmulnbits",
    "w8a8-dynamic": "canonicalize,insert-qdq{act=per-token},lower-w8a8-cpu",
    # onnxruntime-genai's grid (w4a16-genai's), its signed scales, lowered at level 0
    "w4a16-full-range": "canonicalize,quantize-weights{bits=4,group_size=32,sym=true,full_range=true},"
                        "quantize-embeddings{bits=4,group_size=32,sym=true,full_range=true},lower-matmulnbits,"
                        "lower-embeddings",
}
KERNEL = {"w4a16-rtn": "com.microsoft.MatMulNBits", "w8a8-dynamic": "com.microsoft.MatMulIntegerToFloat",
          "w4a16-full-range": "com.microsoft.MatMulNBits"}
#: logits tolerance (relative to the largest): weight-only graphs compute the same function up to float
#: rounding; dynamic int8 activations round the fused norm's output, whose last-bit differences can move
#: an activation by one int8 step (~1/127 of its row's range)
TOL = {"w4a16-rtn": 2e-4, "w8a8-dynamic": 2e-2, "w4a16-full-range": 2e-4}


@pytest.mark.parametrize("recipe", sorted(LOWERED))
def test_fusions_match_lowered_graphs(recipe: str, tmp_path: Path) -> None:
    lowered = run(synthetic(CFG), LOWERED[recipe])
    assert count(lowered, KERNEL[recipe]) >= 7 * CFG.layers
    fused = run(synthetic(CFG), f"{LOWERED[recipe]},{ALL_FUSIONS},fuse-bias")
    fused_float = run(synthetic(CFG), f"canonicalize,{ALL_FUSIONS}")  # what the fusions do before any lowering
    assert count(fused, "com.microsoft.GroupQueryAttention") == CFG.layers
    assert count(fused, "com.microsoft.RotaryEmbedding") == 2 * CFG.layers
    for op in ("com.microsoft.SkipSimplifiedLayerNormalization", "com.microsoft.QuickGelu"):
        assert count(fused, op) == count(fused_float, op) > 0, op
    assert count(fused, "SimplifiedLayerNormalization") == count(fused_float, "SimplifiedLayerNormalization")
    for op in ("Softmax", "Pow", "Neg", "Sigmoid"):
        assert count(fused, op) == 0, op
    assert_same_decoder(runner(lowered, tmp_path / "lowered"), runner(fused, tmp_path / "fused"), WINDOW,
                        steps=24, tol=TOL[recipe])
