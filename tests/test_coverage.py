"""The coverage contract's measurement on hand-built graphs (the families' end-to-end checks are in test_families)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.coverage import UNSUPPORTED, measure
from qcompiler.irutil import add_initializer


def _graph(weights: dict[str, np.ndarray]) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 21})
    for name, w in weights.items():
        mm = ir.node("MatMul", [x, add_initializer(graph, name, w)], name=f"/{name}/MatMul")
        graph.append(mm)
        mm.outputs[0].name = f"{name}_out"
        graph.outputs.append(mm.outputs[0])
    return ir.Model(graph, ir_version=10)


def test_stacked_expert_weights_are_not_silently_float() -> None:
    """gpt_oss exports its experts as MatMuls over ``[E, K, N]`` constants: unsupported, never unlisted."""
    rng = np.random.default_rng(0)
    model = _graph({"experts": rng.standard_normal((4, 8, 16)).astype(np.float32)})
    cov = measure(model)
    assert [(k.node, k.reason) for k in cov.kept_float] == [("/experts/MatMul", UNSUPPORTED)]
    assert cov.unsupported and cov.quantized == 0
