"""fuse-rmsnorm: RMSNorm subgraphs → SimplifiedLayerNormalization, and near misses left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from qcompiler.models.synthetic import SyntheticConfig

from tests.passes.fusion_util import WINDOW, assert_same_decoder, count, node_by_name, run, runner, synthetic


@pytest.mark.parametrize("kv", [True, False])
def test_all_norms_fused_same_logits(tmp_path: Path, kv: bool) -> None:
    cfg = SyntheticConfig(layers=2, kv_cache=kv)
    fused = run(synthetic(cfg), "fuse-rmsnorm")
    assert count(fused, "SimplifiedLayerNormalization") == 2 * cfg.layers + 1
    for op in ("Pow", "ReduceMean", "Sqrt"):
        assert count(fused, op) == 0
    assert_same_decoder(runner(synthetic(cfg), tmp_path / "ref"), runner(fused, tmp_path / "fused"), WINDOW)


def _eps_after_sqrt(proto: onnx.ModelProto) -> None:
    """Layer 0's input norm becomes x / (sqrt(mean(x²)) + ε): ε outside the square root."""
    mean = node_by_name(proto, "layers.0/input_layernorm/ReduceMean")
    add = node_by_name(proto, "layers.0/input_layernorm/Add")
    sqrt = node_by_name(proto, "layers.0/input_layernorm/Sqrt")
    div = node_by_name(proto, "layers.0/input_layernorm/Div")
    add.input[0], sqrt.input[0], div.input[1] = sqrt.output[0], mean.output[0], add.output[0]
    nodes = list(proto.graph.node)
    i, j = nodes.index(add), nodes.index(sqrt)
    nodes[i], nodes[j] = nodes[j], nodes[i]  # keep topological order
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def test_epsilon_outside_sqrt_left_unfused(tmp_path: Path) -> None:
    cfg = SyntheticConfig(layers=2)
    fused = run(synthetic(cfg, _eps_after_sqrt), "fuse-rmsnorm")
    assert count(fused, "SimplifiedLayerNormalization") == 2 * cfg.layers  # all but the edited one
    assert count(fused, "Sqrt") == 1
    ref = runner(synthetic(cfg, _eps_after_sqrt), tmp_path / "ref")
    assert_same_decoder(ref, runner(fused, tmp_path / "fused"), WINDOW)


def test_shared_intermediate_left_unfused() -> None:
    """If an inner value (here 1/rms) is also read elsewhere, the norm stays as it is."""

    def leak(proto: onnx.ModelProto) -> None:
        div = node_by_name(proto, "layers.1/post_attention_layernorm/Div")
        proto.graph.output.append(onnx.helper.make_tensor_value_info(div.output[0], onnx.TensorProto.FLOAT, None))

    fused = run(synthetic(SyntheticConfig(layers=2), leak), "fuse-rmsnorm")
    assert count(fused, "SimplifiedLayerNormalization") == 4
    assert count(fused, "Sqrt") == 1


def test_values_match_formula() -> None:
    """The fused op's attributes carry the graph's ε and γ."""
    cfg = SyntheticConfig(layers=1, eps=3e-4)
    fused = run(synthetic(cfg), "fuse-rmsnorm")
    norms = [n for n in fused.graph if n.op_type == "SimplifiedLayerNormalization"]
    assert all(abs(n.attributes.get_float("epsilon", 0) - 3e-4) < 1e-9 for n in norms)
    assert all(n.inputs[1].const_value is not None and n.inputs[1].const_value.shape == (cfg.hidden,) for n in norms)
    assert np.isclose(norms[0].inputs[1].const_value.numpy()[cfg.outlier_dims[0]], cfg.outlier_gamma)


@pytest.mark.parametrize("swap", [False, True])
def test_half_norm_widened_to_float32_fuses_from_the_half_input(swap: bool) -> None:
    """transformers' fp16 norm: ``γ_h ⊙ Cast_h(x₃₂ / √(mean(x₃₂²) + ε))``, ``x₃₂ = Cast_f32(x_h)`` →
    one ``SimplifiedLayerNormalization(x_h, γ_h)`` (no Cast left), equal within fp16 rounding."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    width = 16
    gamma = (1 + 0.1 * rng.standard_normal(width)).astype(np.float16)
    nodes = [
        h.make_node("Cast", ["x"], ["xf"], to=T.FLOAT),
        h.make_node("Pow", ["xf", "two"], ["sq"]),
        h.make_node("ReduceMean", ["sq", "axes"], ["mean"]),
        h.make_node("Add", ["mean", "eps"], ["tot"]),
        h.make_node("Sqrt", ["tot"], ["rms"]),
        h.make_node("Div", ["one", "rms"], ["inv"]),
        h.make_node("Mul", ["xf", "inv"], ["normed"]),
        h.make_node("Cast", ["normed"], ["nh"], to=T.FLOAT16),
        h.make_node("Mul", ["gamma", "nh"] if swap else ["nh", "gamma"], ["y"]),
    ]
    inits = [nh.from_array(np.array(2, np.float32), "two"), nh.from_array(np.array([-1], np.int64), "axes"),
             nh.from_array(np.array(1e-5, np.float32), "eps"), nh.from_array(np.array(1, np.float32), "one"),
             nh.from_array(gamma, "gamma")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT16, [2, 3, width])],
                         [h.make_tensor_value_info("y", T.FLOAT16, [2, 3, width])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    fused = run(ir.from_proto(proto), "fuse-rmsnorm")
    assert [n.op_type for n in fused.graph] == ["SimplifiedLayerNormalization"]
    norm = next(iter(fused.graph))
    assert norm.inputs[0].dtype == ir.DataType.FLOAT16 and norm.inputs[1].dtype == ir.DataType.FLOAT16
    x = (3 * rng.standard_normal((2, 3, width))).astype(np.float16)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(ir.to_proto(fused).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
