"""fuse-skip-rmsnorm: residual Add + RMSNorm → SkipSimplifiedLayerNormalization (sum from output 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from qcompiler.models.synthetic import SyntheticConfig

from qcompiler.irutil import save_model
from tests.passes.fusion_util import WINDOW, assert_same_decoder, count, run, runner, synthetic


def test_residual_adds_fused_same_decoder(tmp_path: Path) -> None:
    cfg = SyntheticConfig(layers=3)
    fused = run(synthetic(cfg), "fuse-rmsnorm,fuse-skip-rmsnorm")
    # every norm reads a residual sum (the first one the embedding + massive-activation bump)
    assert count(fused, "com.microsoft.SkipSimplifiedLayerNormalization") == 2 * cfg.layers + 1
    assert count(fused, "SimplifiedLayerNormalization") == 0
    assert_same_decoder(runner(synthetic(cfg), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW, steps=16)


def _norm_after_add(shape_b: list[object]) -> onnx.ModelProto:
    """y = RMSNorm(a + b), also returning a + b (as a residual stream would)."""
    h = 8
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Pow", ["s", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["me"]),
        helper.make_node("Sqrt", ["me"], ["r"]),
        helper.make_node("Div", ["one", "r"], ["inv"]),
        helper.make_node("Mul", ["s", "inv"], ["n"]),
        helper.make_node("Mul", ["g", "n"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        onnx.numpy_helper.from_array(np.linspace(0.5, 2, h).astype(np.float32), "g"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "S", h]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, shape_b)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _outputs(model, tmp: Path, b_shape: tuple[int, ...]) -> list[np.ndarray]:
    save_model(model, tmp / "m.onnx")
    sess = ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    return sess.run(None, {"a": rng.standard_normal((2, 3, 8)).astype(np.float32),
                           "b": rng.standard_normal(b_shape).astype(np.float32)})


def test_same_shape_operands_fused(tmp_path: Path) -> None:
    import onnx_ir as ir

    model = ir.serde.deserialize_model(_norm_after_add(["B", "S", 8]))
    ref = _outputs(ir.serde.deserialize_model(_norm_after_add(["B", "S", 8])), tmp_path, (2, 3, 8))
    fused = run(model, "fuse-rmsnorm,fuse-skip-rmsnorm")
    assert count(fused, "com.microsoft.SkipSimplifiedLayerNormalization") == 1
    assert count(fused, "Add") == 0
    got = _outputs(fused, tmp_path, (2, 3, 8))
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_broadcasting_add_left_unfused(tmp_path: Path) -> None:
    """a[B,S,8] + b[8] is not an element-for-element residual sum: the Add stays."""
    import onnx_ir as ir

    fused = run(ir.serde.deserialize_model(_norm_after_add([8])), "fuse-rmsnorm,fuse-skip-rmsnorm")
    assert count(fused, "com.microsoft.SkipSimplifiedLayerNormalization") == 0
    assert count(fused, "SimplifiedLayerNormalization") == 1
    ref = _outputs(ir.serde.deserialize_model(_norm_after_add([8])), tmp_path, (8,))
    for r, g in zip(ref, _outputs(fused, tmp_path, (8,))):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
