"""fuse-bias: a constant bias Add after MatMulNBits becomes the kernel's bias input (also after packing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import (
    WINDOW,
    add_const,
    assert_same_decoder,
    count,
    node_by_name,
    run,
    runner,
    synthetic,
)

CFG = SyntheticConfig(layers=2)
QUANT = "canonicalize,quantize-weights{bits=4,group_size=16},lower-matmulnbits"


def _qkv_bias(proto: onnx.ModelProto) -> None:
    """Qwen-style q/k/v biases: y = x·W + b."""
    rng = np.random.default_rng(1)
    for layer in range(CFG.layers):
        for proj, width in (("q", CFG.hidden), ("k", CFG.kv_heads * CFG.head_dim), ("v", CFG.kv_heads * CFG.head_dim)):
            mm = node_by_name(proto, f"layers.{layer}/self_attn/{proj}_proj/MatMul")
            out = mm.output[0]
            mm.output[0] = out + "_nobias"
            b = add_const(proto, f"{proj}{layer}_bias", (0.5 * rng.standard_normal(width)).astype(np.float32))
            nodes = list(proto.graph.node)
            nodes.insert(nodes.index(mm) + 1, onnx.helper.make_node("Add", [mm.output[0], b], [out]))
            del proto.graph.node[:]
            proto.graph.node.extend(nodes)


@pytest.mark.parametrize("pack", [False, True])
def test_bias_folded(tmp_path: Path, pack: bool) -> None:
    ref = run(synthetic(CFG, _qkv_bias), QUANT)
    adds = count(ref, "Add")
    pipeline = f"fuse-pack-linears,{QUANT},fuse-bias" if pack else f"{QUANT},fuse-bias"
    fused = run(synthetic(CFG, _qkv_bias), pipeline)
    with_bias = [n for n in fused.graph if n.op_type == "MatMulNBits" and len(n.inputs) > 5 and n.inputs[5] is not None]
    assert len(with_bias) == (1 if pack else 3) * CFG.layers
    assert count(fused, "Add") == adds - 3 * CFG.layers
    assert_same_decoder(runner(ref, tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW, steps=16)


def test_shared_output_not_folded() -> None:
    """A linear whose output also feeds something else keeps its Add."""
    model = run(synthetic(CFG, _qkv_bias), QUANT)

    q = next(n for n in model.graph if n.op_type == "MatMulNBits")
    model.graph.outputs.append(q.outputs[0])
    fused = run(model, "fuse-bias")
    assert len(q.inputs) <= 5 or q.inputs[5] is None
    assert count(fused, "com.microsoft.MatMulNBits") == 14
