"""fold-zero-point: integer GEMM on the raw activation + folded bias equals the unfolded QDQ graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from qcompiler.passes.fold_zero_point import FoldZeroPoint, folded_bias

from qcompiler.irutil import add_initializer, op_types
from qcompiler.pipeline import PassContext, make_config
from qcompiler.quant.numerics import quantize_weight
from qcompiler.quant.w8a8 import emit_int8_weight, emit_static_activation, match_w8a8, reference_static_matmul
from qcompiler.spec import Granularity, QuantSpec, linear_info
from tests.helpers import WINDOW
from tests.passes.w8a8_util import compile_model, l2_rel, run_values, shared_calibrator

W8 = QuantSpec(bits=8, symmetric=True, granularity=Granularity.CHANNEL)


def _linear_model(w: np.ndarray, b: np.ndarray, scale: float, zp: int, dtype: str) -> ir.Model:
    """``Y = QDQ(X)·DQ(W_q) + b`` as a one-node-each ONNX model (opset 21)."""
    k = w.shape[0]
    x = ir.Value(name="x", shape=ir.Shape([2, 5, k]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="linear", opset_imports={"": 21})
    wv = add_initializer(graph, "w", w)
    mm = ir.node("MatMul", [x, wv], name="linear_MatMul")
    add = ir.node("Add", [mm.outputs[0], add_initializer(graph, "b", b)], name="bias_Add")
    graph.extend([mm, add])
    add.outputs[0].name = "y"
    add.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(add.outputs[0])
    qw = quantize_weight(w, W8)
    emit_int8_weight(graph, mm, qw.q, qw.scale.reshape(-1), "w")
    emit_static_activation(graph, mm, scale, zp, dtype, "x")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("form", ["msft", "onnx"])
@pytest.mark.parametrize(("dtype", "zp"), [("uint8", 97), ("int8", -20), ("int8", 0)])
def test_single_linear_exact(form: str, dtype: str, zp: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    x = (rng.standard_normal((2, 5, 96)) * 3 + 1).astype(np.float32)
    scale = 0.05
    unfolded = _linear_model(w, b, scale, zp, dtype)
    m = match_w8a8(next(n for n in unfolded.graph if n.op_type == "MatMul"))
    ref = reference_static_matmul(x, scale, zp, dtype, m.w_q, m.w_scale) + b
    y_qdq = _run(unfolded, x)
    folded = _linear_model(w, b, scale, zp, dtype)
    FoldZeroPoint(make_config(FoldZeroPoint, {"form": form}), PassContext())(folded)
    ops = op_types(folded)
    if form == "msft":  # the following bias Add is folded too
        assert ops == {"QuantizeLinear": 1, "com.microsoft.MatMulIntegerToFloat": 1}
    else:
        assert ops == {"QuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 1, "Add": 1}
    y = _run(folded, x)
    assert l2_rel(y_qdq, y) < 1e-6 and l2_rel(ref, y) < 1e-6
    np.testing.assert_allclose(y, y_qdq, rtol=1e-5, atol=1e-5 * np.abs(y_qdq).max())
    # the folded bias is b − s_x·s_w·z_x·colsum(W_q)
    expect = b.astype(np.float64) - scale * m.w_scale.astype(np.float64) * zp * m.w_q.astype(np.int64).sum(0)
    np.testing.assert_allclose(folded_bias(m.w_q, m.w_scale, scale, zp, b), expect, rtol=1e-6, atol=1e-7)


def test_decoder_every_linear_exact(synthetic_dir, synthetic_text, tmp_path_factory, tmp_path) -> None:
    folder, _ = synthetic_dir
    calib = shared_calibrator(tmp_path_factory, folder, synthetic_text)
    pipe = "canonicalize,insert-qdq{act=static,dtype=uint8,sym=false}"
    qdq, _ = compile_model(folder, pipe, calib)
    params = {linear_info(n).key: match_w8a8(n) for n in qdq.graph if linear_info(n) and match_w8a8(n)}
    model, ctx = compile_model(folder, pipe + ",fold-zero-point", calib)
    ops = op_types(model)
    assert ops["com.microsoft.MatMulIntegerToFloat"] == 14 and ops["QuantizeLinear"] == 8
    assert "DequantizeLinear" not in ops
    assert ctx.report["fold-zero-point"]["folded (zero point ≠ 0)"] == 14
    # each integer GEMM computes the QDQ semantics on its own float input
    names = {}
    for node in model.graph:
        if node.op_type == "MatMulIntegerToFloat":
            key = linear_info(node).key
            names[key] = (params[key].x.name, node.outputs[0].name)
    got = run_values(model, [v for pair in names.values() for v in pair], WINDOW, tmp_path)
    for key, (xn, yn) in names.items():
        p = params[key]
        ref = reference_static_matmul(got[xn][0], p.x_scale, p.x_zero, p.x_zero_dtype, p.w_q, p.w_scale)
        assert l2_rel(ref, got[yn][0]) < 1e-5, key
