"""Building requests from the graph's structure: the inputs of linear layers, or every activation.

q/k/v read one normalized input and gate/up another, so a decoder layer has four
distinct linear inputs (attention in, o in, MLP in, down in): asking per distinct
input gives one Hessian shared by the linears that read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
import onnx_ir as ir

from qcompiler.calibrate.config import StatRequest
from qcompiler.canonical import canonical_summary
from qcompiler.spec import DECODER_ROLES, Role, linear_info


def linear_inputs(model: ir.Model, roles: Iterable[Role] = DECODER_ROLES) -> dict[str, list[str]]:
    """``{input value name: [linear keys reading it]}`` in graph order (canonicalizes if needed)."""
    canonical_summary(model)
    wanted = set(roles)
    found: dict[str, list[str]] = {}
    for node in model.graph:
        info = linear_info(node)
        if info is not None and info.role in wanted and node.inputs[0] is not None:
            found.setdefault(node.inputs[0].name, []).append(info.key)
    return found


def linear_requests(model: ir.Model, observers: Sequence[str], roles: Iterable[Role] = DECODER_ROLES) -> list[StatRequest]:
    """One request per distinct linear input (see :func:`linear_inputs`)."""
    return [StatRequest(name, tuple(observers)) for name in linear_inputs(model, roles)]


def float_activations(model: ir.Model) -> list[str]:
    """Every floating-point node output of the main graph (types from ONNX shape inference)."""
    proto = ir.serde.serialize_model(model)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    typed = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.output)}
    out = []
    for node in model.graph:
        if node.op_type == "Constant":
            continue
        for o in node.outputs:
            dtype = int(o.dtype) if o.dtype is not None else typed.get(o.name)
            if o.name and dtype in floats:
                out.append(o.name)
    return out
