"""The graph's float type: what every emitted scale, zero point, bias, Cast and constant follows.

A model exported with ``--dtype fp16`` (or ``bf16``) holds its weights, activations and KV
cache in that type; a node mixing it with float32 (``MatMul(fp16, fp32)``) is a type error in
ONNX Runtime.  Emitters therefore never name a float type: they take it from the value they
rewrite (:func:`float_type`), and write float constants through :func:`float_array`.
Statistics and error analysis stay wide (float32/float64) whatever the graph holds; only what
is written into the graph is narrowed, once, at the end.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: The float types a graph may compute in.
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
#: ``--dtype`` spellings.
DTYPE_NAMES = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
#: Largest finite float16 magnitude.
FP16_MAX = 65504.0


def float_type(*values: ir.Value | None, default: ir.DataType = ir.DataType.FLOAT) -> ir.DataType:
    """The first float type (fp32/fp16/bf16) among ``values``' dtypes, else ``default``."""
    for v in values:
        if v is not None and v.dtype in FLOAT_TYPES:
            return v.dtype  # type: ignore[return-value]
    return default


def graph_float_type(graph: ir.Graph) -> ir.DataType:
    """The float type the graph computes in: its first float output's (the logits), else its
    most common float initializer type, else float32."""
    for v in graph.outputs:
        if v.dtype in FLOAT_TYPES:
            return v.dtype  # type: ignore[return-value]
    counts: dict[ir.DataType, int] = {}
    for v in graph.initializers.values():
        if v.dtype in FLOAT_TYPES:
            counts[v.dtype] = counts.get(v.dtype, 0) + 1  # type: ignore[index]
    return max(counts, key=counts.__getitem__) if counts else ir.DataType.FLOAT


def file_float_type(path) -> ir.DataType:
    """The float type of a saved model (``model.onnx`` or its folder): its first float output's,
    read from the graph's header without its weights (float32 when it has none)."""
    from pathlib import Path

    import onnx

    p = Path(path)
    proto = onnx.load(str(p / "model.onnx" if p.is_dir() else p), load_external_data=False)
    for vi in proto.graph.output:
        t = vi.type.tensor_type.elem_type
        if t in (int(d) for d in FLOAT_TYPES):
            return ir.DataType(t)
    return ir.DataType.FLOAT


def np_float(dtype: ir.DataType) -> np.dtype:
    """numpy dtype of an ONNX float type (``ml_dtypes.bfloat16`` for bf16)."""
    return np.dtype(dtype.numpy())


def float_array(array: np.ndarray | float, dtype: ir.DataType) -> np.ndarray:
    """``array`` in the float type ``dtype`` (float64/float32 values rounded once, to nearest)."""
    out = np.asarray(array, dtype=np.float32).astype(np_float(dtype))
    return np.ascontiguousarray(out) if out.ndim else out  # ascontiguousarray makes a scalar 1-D


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as bf16 storage: the upper 16 bits (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def lowest(dtype: ir.DataType) -> float:
    """The lowest finite value of a float type (−65504 for fp16)."""
    import ml_dtypes

    return float(ml_dtypes.finfo(np_float(dtype)).min)


def type_name(dtype: ir.DataType) -> str:
    """``fp32``/``fp16``/``bf16`` for a float type (its ONNX name otherwise)."""
    for k, v in DTYPE_NAMES.items():
        if v == dtype:
            return k
    return dtype.name.lower()


def widen_bf16(proto) -> bool:
    """Rewrite a bf16 ``onnx.ModelProto`` in place to compute in float32; returns whether it did.

    ONNX Runtime's CPU provider has no bf16 MatMul, so calibration and the analysis sessions
    run a bf16 graph widened (:func:`widen_float`).  bf16 → float32 is exact, so the statistics
    are those of the bf16 weights computed wide (the bf16 rounding of intermediate activations
    is not reproduced).
    """
    import onnx

    return widen_float(proto, (onnx.TensorProto.BFLOAT16,))


def widen_float(proto, types: tuple[int, ...]) -> bool:
    """Rewrite an ``onnx.ModelProto`` in place to compute in float32 where it computes in one of
    ``types`` (ONNX element types); returns whether it changed anything.

    Every such initializer is read through ``Cast(→ float32)`` (the weights stay where they are,
    in their external file), graph inputs, outputs, value types, ``Constant`` /
    ``ConstantOfShape`` values and ``Cast(to=…)`` of those types become float32.  Used for bf16
    on CPU (:func:`widen_bf16`) and for the fp16 range check (``keep-fp32``: a value past 65504
    is measured, not ``inf``).
    """
    import onnx
    from onnx import helper, numpy_helper

    narrow, f32 = set(types), onnx.TensorProto.FLOAT
    g = proto.graph
    changed = False

    def _retype(vi) -> None:
        nonlocal changed
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in narrow:
            vi.type.tensor_type.elem_type = f32
            changed = True

    for vi in (*g.input, *g.output, *g.value_info):
        _retype(vi)
    casts = []
    for t in g.initializer:
        if t.data_type in narrow:
            wide = f"{t.name}__narrow"
            casts.append(helper.make_node("Cast", [wide], [t.name], to=f32, name=f"{t.name}__widen"))
            t.name = wide
    for node in g.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i in narrow:
                    a.i = f32
                    changed = True
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in narrow:
                arr = numpy_helper.to_array(a.t).astype(np.float32)
                a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
                changed = True
    if casts:
        nodes = list(g.node)
        del g.node[:]
        g.node.extend([*casts, *nodes])
        changed = True
    return changed
