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
