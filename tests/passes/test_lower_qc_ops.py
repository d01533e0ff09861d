"""lower-qc-ops: per-token W8A8 and outlier-split GEMMs → qcompiler's ops, same logits (CPU kernels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.lower_qc_ops import LowerQcOps

from qcompiler.irutil import load_model, op_types, save_model
from qcompiler.ops import build_library, reference
from qcompiler.ops.emit import emit_outlier_split, match_outlier_split
from qcompiler.pipeline import PassContext, run_passes
from qcompiler.quant.w8a8 import emit_int8_weight, emit_per_token_activation
from qcompiler.runtime import make_session
from tests.helpers import WINDOW, rel_err, run_logits
from tests.ops.helpers import apply_w8a8, decoder_linears, int8_weight


@pytest.fixture(scope="module", autouse=True)
def ops_lib() -> Path:
    return build_library(cuda=False).cpu_library


def w8a8_model(folder: Path, **kw: object) -> ir.Model:
    model = load_model(folder / "model.onnx")
    run_passes(model, [Canonicalize()])
    apply_w8a8(model, **kw)  # type: ignore[arg-type]
    return model


def test_per_token_becomes_w8a8matmul_with_same_logits(synthetic_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_dir
    model = w8a8_model(folder)
    portable = run_logits(model, WINDOW, tmp_path / "qdq", optimize=False)
    ctx = PassContext()
    model, _ = run_passes(model, [LowerQcOps(None, ctx)])
    ops = op_types(model)
    assert ops.get("qcompiler.W8A8MatMul") == 14
    assert not {"Round", "Clip", "DequantizeLinear", "ReduceMax"} & set(ops)
    assert ctx.report["lower-qc-ops"] == {"W8A8MatMul": 14}
    assert model.opset_imports["qcompiler"] == 1
    lowered = run_logits(model, WINDOW, tmp_path / "qc")
    assert rel_err(portable, lowered) < 1e-3
    # the layer/role annotations survive on the new nodes
    assert sum(1 for n in model.graph if n.op_type == "W8A8MatMul" and "qc.role" in n.metadata_props) == 14


def test_outlier_split_portable_form_and_lowering(synthetic_dir, tmp_path: Path) -> None:
    folder, truth = synthetic_dir
    model = w8a8_model(folder, outliers=truth.outlier_dims)
    adds = [n for n in model.graph if n.op_type == "Add" and match_outlier_split(n) is not None]
    assert len(adds) == 14  # every decoder linear has K > max(outlier dims)
    portable = run_logits(model, WINDOW, tmp_path / "portable", optimize=False)
    float_logits = run_logits(folder, WINDOW)
    ctx = PassContext()
    model, _ = run_passes(model, [LowerQcOps(None, ctx)])
    assert op_types(model).get("qcompiler.W8A8OutlierMatMul") == 14
    assert not [n for n in model.graph if n.name.endswith(("outlier_Gather", "_keep_Mul", "outlier_MatMul"))]
    lowered = run_logits(model, WINDOW, tmp_path / "qc")
    assert rel_err(portable, lowered) < 1e-3
    # keeping the outlier channels in float beats plain per-token W8A8 on this model
    plain = run_logits(w8a8_model(folder), WINDOW, tmp_path / "plain", optimize=False)
    assert rel_err(float_logits, lowered) < rel_err(float_logits, plain)


def test_emit_outlier_split_custom_op_equals_portable(synthetic_dir, tmp_path: Path) -> None:
    folder, truth = synthetic_dir
    logits = {}
    for custom in (False, True):
        model = load_model(folder / "model.onnx")
        run_passes(model, [Canonicalize()])
        node = decoder_linears(model)[4]  # gate_proj of layer 0
        w = node.inputs[1].const_value.numpy()
        idx = np.array(truth.outlier_dims, np.int64)
        q, s = int8_weight(np.where(np.isin(np.arange(w.shape[0]), idx)[:, None], 0, w))
        new = emit_outlier_split(model.graph, node, q, s, idx, w[idx], custom_op=custom)
        assert (len(new) == 1) == custom
        model.opset_imports.setdefault("qcompiler", 1)
        model.opset_imports[""] = 21
        logits[custom] = run_logits(model, WINDOW, tmp_path / str(custom), optimize=False)
    assert rel_err(logits[False], logits[True]) < 1e-4


def _tiny(dtype: int, bias: bool) -> ir.Model:
    k, n = 24, 10
    rng = np.random.default_rng(0)
    np_t = np.float32 if dtype == TensorProto.FLOAT else np.float16
    w = rng.standard_normal((k, n)).astype(np_t)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"], name="lin")]
    inits = [numpy_helper.from_array(w, "W")]
    if bias:
        nodes.append(helper.make_node("Add", ["y0", "b"], ["y"], name="bias_add"))
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np_t), "b"))
    else:
        nodes[0].output[0] = "y"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", dtype, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", dtype, ["b", "t", n])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    node = next(nd for nd in model.graph if nd.op_type == "MatMul")
    q, s = int8_weight(w.astype(np.float32))
    emit_int8_weight(model.graph, node, q, s, "lin")
    emit_per_token_activation(model.graph, node, "lin")
    if dtype == TensorProto.FLOAT16:  # the emitters write float32 constants: make the form float16
        for v in model.graph.initializers.values():
            if v.const_value.dtype == ir.DataType.FLOAT:
                v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
                v.type = ir.TensorType(ir.DataType.FLOAT16)
    return model


def _run(model: ir.Model, x: np.ndarray, tmp: Path) -> np.ndarray:
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, tmp / "model.onnx")
    return make_session(tmp, optimize=False).run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("bias", [False, True])
def test_bias_folds_and_float16_runs(tmp_path: Path, dtype: int, bias: bool) -> None:
    np_t = np.float32 if dtype == TensorProto.FLOAT else np.float16
    x = (np.random.default_rng(1).standard_normal((2, 5, 24)) * 3).astype(np_t)
    model = _tiny(dtype, bias)
    portable = _run(model, x, tmp_path / "portable")
    w_dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    w_q, w_s = w_dq.inputs[0].const_value.numpy(), w_dq.inputs[1].const_value.numpy()
    b = next((v.const_value.numpy() for v in model.graph.initializers.values() if v.name == "b"), None)
    LowerQcOps()(model)
    ops = op_types(model)
    assert ops == {"qcompiler.W8A8MatMul": 1}  # the bias Add is folded into the op
    assert len(next(n for n in model.graph).inputs) == (4 if bias else 3)
    y = _run(model, x, tmp_path / "qc")
    assert y.dtype == np_t and y.shape == (2, 5, 10)
    ref = reference.w8a8_matmul(x, w_q.T.copy(), w_s, None if b is None else b.astype(np.float32))
    tol = 1e-5 if np_t == np.float32 else 2e-3
    assert rel_err(ref, y.astype(np.float32)) < tol
    # the float16 portable form computes its row scales in float16, the op in float32
    assert rel_err(portable.astype(np.float32), y.astype(np.float32)) < (1e-4 if np_t == np.float32 else 1e-2)


def test_static_w8a8_is_left_as_qdq(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = w8a8_model(folder, kind="static")
    ctx = PassContext()
    result = LowerQcOps(None, ctx)(model)
    assert result.modified is False
    assert ctx.report["lower-qc-ops"] == {"static W8A8 left as QDQ": 14}
    assert "qcompiler" not in model.opset_imports


def test_float_model_untouched(synthetic_dir) -> None:
    folder, _ = synthetic_dir
    model = load_model(folder / "model.onnx")
    before = op_types(model)
    assert LowerQcOps()(model).modified is False
    assert op_types(model) == before


def test_shared_per_token_activation(synthetic_dir, tmp_path: Path) -> None:
    folder, _ = synthetic_dir
    model = w8a8_model(folder, share=True)
    portable = run_logits(model, WINDOW, tmp_path / "portable", optimize=False)
    LowerQcOps()(model)
    ops = op_types(model)
    assert ops.get("qcompiler.W8A8MatMul") == 14 and "Round" not in ops
    assert rel_err(portable, run_logits(model, WINDOW, tmp_path / "qc")) < 1e-3
