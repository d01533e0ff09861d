"""A float32 synthetic model converted to fp16 or bf16, as a half-precision export holds it.

Every float initializer, ``Constant``, ``ConstantOfShape`` value, ``Cast`` to float32, graph
input/output and intermediate value type becomes ``dtype``; values past the type's finite
range are clamped to it (bf16: ``Cos``/``Sin``, which ONNX defines for no bf16, compute in
float32 between Casts, as torch exports them) (the additive mask's −3·10³⁸ becomes −65504 in fp16, as torch's
export of a half model writes ``finfo(half).min``).  Used by the tests to run every pass on
fp16/bf16 graphs of the same seeded model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.floattype import float_array, lowest


def _narrow(t: ir.TensorProtocol, dtype: ir.DataType) -> ir.Tensor:
    a = np.asarray(t.numpy(), np.float32)
    lo = lowest(dtype)
    return ir.Tensor(float_array(np.clip(a, lo, -lo), dtype), name=t.name)


def to_float_type(model: onnx.ModelProto, dtype: ir.DataType) -> onnx.ModelProto:
    """``model`` (float32) with its float type replaced by ``dtype`` (see module docstring)."""
    m = ir.serde.deserialize_model(model)
    f32 = ir.DataType.FLOAT
    g = m.graph
    for v in list(g.initializers.values()):
        if v.dtype == f32 and v.const_value is not None:
            v.const_value = _narrow(v.const_value, dtype)
            v.type = ir.TensorType(dtype)
    for node in ir.traversal.RecursiveGraphIterator(g):
        if node.op_type == "Cast" and node.attributes.get_int("to", -1) == f32.value:
            node.attributes["to"] = ir.AttrInt64("to", dtype.value)
        for key in ("value",):
            attr = node.attributes.get(key)
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == f32:
                node.attributes[key] = ir.AttrTensor(key, _narrow(attr.value, dtype))
        for out in node.outputs:
            if out.dtype == f32:
                out.type = ir.TensorType(dtype)
    for v in (*g.inputs, *g.outputs):
        if v.dtype == f32:
            v.type = ir.TensorType(dtype)
    if dtype == ir.DataType.BFLOAT16:  # ONNX's Cos/Sin have no bf16: the rotary tables stay float32
        for node in [n for n in g if n.op_type in ("Cos", "Sin")]:
            widen = ir.node("Cast", [node.inputs[0]], {"to": f32.value}, name=f"{node.name}_in_Cast")
            widen.outputs[0].type = ir.TensorType(f32)
            out = node.outputs[0]
            narrow = ir.node("Cast", [out], {"to": dtype.value}, name=f"{node.name}_out_Cast")
            narrow.outputs[0].type, narrow.outputs[0].shape = ir.TensorType(dtype), out.shape
            out.replace_all_uses_with(narrow.outputs[0])
            narrow.replace_input_with(0, out)
            out.type = ir.TensorType(f32)
            g.insert_before(node, widen)
            g.insert_after(node, narrow)
            node.replace_input_with(0, widen.outputs[0])
    return ir.serde.serialize_model(m)
