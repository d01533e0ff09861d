"""fuse-gqa-rotary: GroupQueryAttention reads the packed q|k|v and applies the rotary itself (do_rotary=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import ALL_FUSIONS, WINDOW, assert_same_decoder, count, run, runner, synthetic

CFG = SyntheticConfig(layers=2, hidden=576, heads=9, kv_heads=3, intermediate=256, vocab=256, kv_cache=True)
BASE = {
    "float": f"canonicalize,{ALL_FUSIONS}",
    "w4a16-rtn": f"canonicalize,quantize-weights{{bits=4,group_size=32}},{ALL_FUSIONS},lower-matmulnbits,fuse-bias",
}


@pytest.mark.parametrize("form", sorted(BASE))
def test_same_decoder_fewer_nodes(form: str, tmp_path: Path) -> None:
    before = run(synthetic(CFG), BASE[form])
    after = run(synthetic(CFG), f"{BASE[form]},fuse-gqa-rotary")
    assert count(before, "com.microsoft.RotaryEmbedding") == 2 * CFG.layers
    assert count(after, "com.microsoft.RotaryEmbedding") == 0
    gqas = [n for n in after.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqas) == CFG.layers
    for g in gqas:
        assert g.attributes.get_int("do_rotary", 0) == 1 and g.inputs[1] is None and g.inputs[2] is None
        assert g.inputs[9] is not None and g.inputs[9].name == "position_ids"
        assert g.inputs[0].producer().op_type in ("MatMul", "MatMulNBits")  # the packed q|k|v linear itself
    assert count(after, "Split") == count(before, "Split") - CFG.layers  # the q|k|v Splits (gate|up stays)
    # real numerics (ORT): prefill logits and 24 greedy steps through the KV cache, rotary from the kernel
    # (positions past the prompt: the caches are indexed by position up to total_sequence_length)
    assert_same_decoder(runner(before, tmp_path / "a"), runner(after, tmp_path / "b"), WINDOW, steps=24)


def test_non_positional_tables_left_alone(tmp_path: Path) -> None:
    """A graph whose rotary tables read another input than position_ids keeps its RotaryEmbedding nodes."""
    import onnx_ir as ir

    model = run(synthetic(CFG), BASE["float"])
    rot = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    cos = rot.inputs[2]
    extra = ir.Value(name="cos_scale", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(extra)
    mul = ir.node("Mul", [cos, extra], name="scale_cos")
    model.graph.insert_after(cos.producer(), mul)
    for node in [n for n in model.graph if n.op_type == "RotaryEmbedding"]:
        node.replace_input_with(2, mul.outputs[0])
    after = run(model, "fuse-gqa-rotary")
    assert count(after, "com.microsoft.RotaryEmbedding") == 2 * CFG.layers
    assert all(n.attributes.get_int("do_rotary", 0) == 0 for n in after.graph if n.op_type == "GroupQueryAttention")
