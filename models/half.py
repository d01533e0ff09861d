"""A float32 synthetic model converted to fp16 or bf16, as a half-precision export holds it.

Every float initializer, ``Constant``, ``ConstantOfShape`` value, ``Cast`` to float32, graph
input/output and intermediate value type becomes ``dtype``; values past the type's finite
range are clamped to it (bf16: ``Cos``/``Sin``, which ONNX defines for no bf16, compute in
float32 between Casts, as torch exports them) (the additive mask's lowest float32 becomes −65504 in fp16, as torch's
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


def inject_overflow(model: onnx.ModelProto, value: float = 1.5e5, col: int = 11) -> onnx.ModelProto:
    """A float32 synthetic model whose layer-0 ``down_proj`` writes ``value`` into residual channel ``col``
    on the first token of the model's test window (a super weight): past fp16's 65504 there.

    The first token's largest MLP input channel ``r`` (measured with ONNX Runtime on the float32
    model) gets ``W_down[r, col] += value / x_r``; other tokens get their share of it.
    """
    import onnxruntime as ort
    from onnx import numpy_helper

    from qcompiler.runtime import DecoderRunner

    window = (np.arange(48) * 37 + 11) % 256  # tests.helpers.WINDOW
    prod = next(n.output[0] for n in model.graph.node if n.name.startswith("/model/layers.0/mlp/Mul"))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=prod))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (x,) = sess.run([prod], DecoderRunner(sess, require_logits=False).feeds(window[None]))
    row = int(np.argmax(np.abs(x[0, 0])))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == "/model/layers.0/mlp/down_proj.weight":
            w = numpy_helper.to_array(t).copy()
            w[row, col] += value / x[0, 0, row]
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out
