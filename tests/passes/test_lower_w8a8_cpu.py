"""lower-w8a8-cpu: portable W8A8 → MatMulIntegerToFloat on ONNX Runtime CPU, same logits."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.lower_matmulnbits import LowerMatMulNBits
from qcompiler.passes.lower_w8a8_cpu import WEIGHT_FORMS, LowerW8A8Cpu

from qcompiler.irutil import load_model, op_types
from qcompiler.pipeline import PassContext, run_passes
from tests.helpers import WINDOW, rel_err, run_logits
from tests.ops.helpers import apply_w8a8


@pytest.mark.parametrize("kind,dtype", [("per-token", "int8"), ("static", "int8"), ("static", "uint8")])
def test_integer_gemm_gives_portable_logits(synthetic_dir, tmp_path: Path, kind: str, dtype: str) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    run_passes(model, [Canonicalize()])
    apply_w8a8(model, kind=kind, static_dtype=dtype)
    portable = run_logits(model, WINDOW, tmp_path / "portable", optimize=False)
    ctx = PassContext()
    # the target's order: W8A8 lowering first, then weight-only lowering finds nothing left
    model, _ = run_passes(model, [LowerW8A8Cpu(None, ctx), LowerMatMulNBits()])
    ops = op_types(model)
    assert ops.get("com.microsoft.MatMulIntegerToFloat") == 14
    assert "com.microsoft.MatMulNBits" not in ops and "DequantizeLinear" not in ops
    assert ctx.report["lower-w8a8-cpu"] == {kind: 14, "weights": WEIGHT_FORMS["any"]}
    if kind == "per-token":
        assert "Round" in ops and ops.get("Cast", 0) >= 14  # q is computed in-graph, shifted by 128 and cast to uint8
    else:
        assert ops.get("QuantizeLinear") == 14
        # int8 activations are re-quantized as uint8 (z + 128): MLAS has fast kernels for uint8 activations only
        for node in model.graph:
            if node.op_type == "MatMulIntegerToFloat":
                assert node.inputs[0].producer().inputs[2].dtype == ir.DataType.UINT8
    lowered = run_logits(model, WINDOW, tmp_path / "int")
    assert rel_err(portable, lowered) < 1e-3


def test_outlier_split_int8_part_is_lowered(synthetic_dir, tmp_path: Path) -> None:
    folder, truth = synthetic_dir
    model = load_model(folder / "model.onnx")
    run_passes(model, [Canonicalize()])
    apply_w8a8(model, outliers=truth.outlier_dims)
    portable = run_logits(model, WINDOW, tmp_path / "portable", optimize=False)
    LowerW8A8Cpu()(model)
    ops = op_types(model)
    assert ops.get("com.microsoft.MatMulIntegerToFloat") == 14 and ops.get("Gather", 0) >= 14
    assert rel_err(portable, run_logits(model, WINDOW, tmp_path / "int")) < 1e-3


def test_weight_only_model_untouched(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    before = op_types(model)
    assert LowerW8A8Cpu()(model).modified is False
    assert op_types(model) == before


def test_static_bias_folds_into_matmulintegertofloat(tmp_path: Path) -> None:
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.irutil import save_model
    from qcompiler.quant.w8a8 import emit_int8_weight, emit_static_activation
    from qcompiler.runtime import make_session
    from tests.ops.helpers import int8_weight

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((24, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y0"], name="lin"), helper.make_node("Add", ["y0", "b"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", 10])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    node = next(n for n in model.graph if n.op_type == "MatMul")
    emit_int8_weight(model.graph, node, *int8_weight(w), "lin")
    emit_static_activation(model.graph, node, 0.03, 128, "uint8", "lin")
    x = rng.standard_normal((7, 24)).astype(np.float32)
    outs = []
    for i, lower in enumerate((False, True)):
        if lower:
            LowerW8A8Cpu()(model)
            (mm,) = [n for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
            assert len(mm.inputs) == 7 and "Add" not in op_types(model)
        (tmp_path / str(i)).mkdir()
        save_model(model, tmp_path / str(i) / "model.onnx")
        outs.append(make_session(tmp_path / str(i), optimize=False).run(None, {"x": x})[0])
    assert rel_err(outs[0], outs[1]) < 1e-5


def test_shared_per_token_activation(synthetic_dir, tmp_path: Path) -> None:
    """q/k/v and gate/up reading one quantized activation keep sharing it (one uint8 Cast per input)."""
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    run_passes(model, [Canonicalize()])
    apply_w8a8(model, share=True)
    assert op_types(model)["Round"] == 8  # 2 layers x (qkv, o, gate/up, down)
    portable = run_logits(model, WINDOW, tmp_path / "portable", optimize=False)
    LowerW8A8Cpu()(model)
    ops = op_types(model)
    assert ops.get("com.microsoft.MatMulIntegerToFloat") == 14 and ops["Round"] == 8
    casts = [n for n in model.graph if n.op_type == "Cast" and n.name.endswith("_q_Cast")]
    assert len(casts) == 8 and all(c.attributes.get_int("to") == ir.DataType.UINT8 for c in casts)
    for gemm in (n for n in model.graph if n.op_type == "MatMulIntegerToFloat"):  # u8 activations, zero point 128
        assert gemm.inputs[0].producer() in casts and int(gemm.inputs[4].const_value.numpy()) == 128
    assert rel_err(portable, run_logits(model, WINDOW, tmp_path / "int")) < 1e-3
