"""Write a quantized weight into the graph in the portable form and read it back.

The portable form of a quantized linear ``Y = X·Ŵ`` is standard ONNX (opset 21)::

    W_q (int4/uint4/int8/uint8 [K, N]) ─┐
    W_scale ([K/g, N] or [N])           ├─ DequantizeLinear(axis, block_size) ─ MatMul(X, ·)
    W_zp (same type as W_q, optional)  ─┘

``axis=0, block_size=g`` for group-wise, ``axis=1`` (per output column) for
per-channel.  Every weight-quantizing pass (RTN, AWQ, GPTQ, HQQ) writes this form;
target lowering (``lower-matmulnbits``) rewrites it, and the NPU target keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.floattype import float_array, float_type, graph_float_type, type_name
from qcompiler.irutil import add_initializer, linear_weight
from qcompiler.quant.numerics import QuantizedWeight
from qcompiler.spec import QuantSpec, set_weight_spec

QWEIGHT_KEY = "qc.qweight"  # DequantizeLinear node → WeightDQ


def _int_dtype(bits: int, symmetric: bool) -> ir.DataType:
    if bits <= 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


def stored_spec(spec: QuantSpec, graph: ir.Graph, node: ir.Node) -> QuantSpec:
    """``spec`` with the scale type the emitters will write for linear ``node`` (its weight's float
    type, else its output's, else the graph's), so the quantizer chooses codes for the stored scale."""
    found = linear_weight(node)
    ftype = float_type(found[0] if found else None, node.outputs[0], default=graph_float_type(graph))
    name = type_name(ftype)
    return spec if spec.scale_dtype == name or name not in ("fp32", "fp16", "bf16") else replace(spec, scale_dtype=name)


def emit_dequantized_weight(graph: ir.Graph, node: ir.Node, qw: QuantizedWeight, base_name: str) -> ir.Node:
    """Replace the float weight of linear ``node`` by ``DequantizeLinear`` of ``qw``.

    The caller raises the model's default opset to 21 (``irutil.QUANT_OPSET``).  Returns the new DequantizeLinear node (inserted before ``node``).  The old weight
    initializer is dropped if nothing else uses it.
    """
    found = linear_weight(node)
    if found is None:
        raise ValueError(f"{node.name} is not a linear node")
    old_w, transposed = found
    if transposed:
        raise ValueError(f"{node.name}: transposed (tied) weights are emitted by the embedding path")
    k, n = qw.q.shape
    spec = qw.spec
    if not np.isfinite(qw.scale).all():  # never write a NaN/Inf scale, whichever method made it
        raise QCError(f"{base_name}: quantization produced non-finite scales (NaN/Inf in the weight or its range)")
    dtype = _int_dtype(spec.bits, spec.symmetric)
    ftype = float_type(old_w, node.outputs[0], default=graph_float_type(graph))  # the scale and Ŵ take the weight's float type
    q_np = qw.q.astype(np.int8 if spec.symmetric else np.uint8, copy=False)
    q_val = add_initializer(graph, f"{base_name}_q{spec.bits}", ir.Tensor(q_np, dtype=dtype))
    per_channel = qw.group_size >= k and qw.scale.shape[0] == 1
    if per_channel:
        scale = float_array(qw.scale.reshape(n), ftype)
        zp = None if qw.zero_point is None else qw.zero_point.reshape(n)
        attrs: dict[str, int] = {"axis": 1}
    else:
        scale = float_array(qw.scale, ftype)
        zp = qw.zero_point
        attrs = {"axis": 0, "block_size": qw.group_size}
    s_val = add_initializer(graph, f"{base_name}_scale", scale)
    inputs = [q_val, s_val]
    if zp is not None:
        inputs.append(add_initializer(graph, f"{base_name}_zp", ir.Tensor(zp.astype(np.uint8), dtype=dtype)))
    dq = ir.node(
        "DequantizeLinear",
        inputs,
        attributes=attrs,
        name=f"{base_name}_DequantizeLinear",
        outputs=[ir.Value(name=f"{base_name}_dq", shape=ir.Shape([k, n]), type=ir.TensorType(ftype))],
    )
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])
    dq.meta[QWEIGHT_KEY] = WeightDQ(spec, qw.group_size, k, n)
    set_weight_spec(node, spec)
    if not old_w.uses() and old_w.name in graph.initializers and old_w not in graph.outputs:
        del graph.initializers[old_w.name]
    return dq


@dataclass(frozen=True)
class WeightDQ:
    """Annotation of a weight DequantizeLinear written by :func:`emit_dequantized_weight`."""

    spec: QuantSpec
    group_size: int
    k: int
    n: int


@dataclass(frozen=True)
class DQWeight:
    """A weight DequantizeLinear feeding a MatMul, read back from the graph."""

    dq: ir.Node
    q: np.ndarray  # [K, N] int8/uint8 values
    scale: np.ndarray  # [G, N] float32 (read wide)
    zero_point: np.ndarray | None  # [G, N]
    bits: int
    symmetric: bool
    group_size: int  # K for per-channel
    scale_type: ir.DataType = ir.DataType.FLOAT  # the scale's type in the graph (the graph's float type)


_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


@dataclass(frozen=True)
class DQConstants:
    """The constant operands of a 2-D int4/int8 ``DequantizeLinear``, decoded; the layout (which
    ``axis``, ``block_size``) is the reader's to check."""

    q: np.ndarray  # 2-D, int8 (signed grid) or uint8 values
    scale: np.ndarray  # float32 (read wide), as stored
    zero_point: np.ndarray | None  # uint8, as stored; None on a signed grid
    bits: int
    symmetric: bool
    axis: int
    block: int  # block_size; 0 when per-axis
    scale_type: ir.DataType  # the scale's type in the graph


def read_dq_constants(dq: ir.Node) -> DQConstants | None:
    """:class:`DQConstants` of ``dq`` if it is ``DequantizeLinear(const int4/int8 [A, B], const scale[,
    const zero point])``; None otherwise (also for a signed grid with a non-zero zero point)."""
    if dq.op_type != "DequantizeLinear" or dq.domain != "" or len(dq.inputs) < 2:
        return None
    qv, sv = dq.inputs[0], dq.inputs[1]
    zv = dq.inputs[2] if len(dq.inputs) > 2 else None
    if qv is None or qv.const_value is None or sv is None or sv.const_value is None:
        return None
    if zv is not None and zv.const_value is None:
        return None
    qt = qv.const_value
    bits = _BITS.get(qt.dtype)
    if len(qt.shape) != 2 or bits is None:
        return None
    symmetric = qt.dtype in (ir.DataType.INT4, ir.DataType.INT8)
    zp = zv.const_value.numpy().astype(np.int16) if zv is not None else None
    if zp is not None and symmetric and np.any(zp != 0):
        return None  # signed grid with a zero point: not a form we lower
    return DQConstants(qt.numpy().astype(np.int8 if symmetric else np.uint8, copy=False),
                       sv.const_value.numpy().astype(np.float32),
                       None if symmetric or zp is None else zp.astype(np.uint8), bits, symmetric,
                       dq.attributes.get_int("axis", 1), dq.attributes.get_int("block_size", 0), float_type(sv))


def read_dq_weight(value: ir.Value) -> DQWeight | None:
    """If ``value`` is ``DequantizeLinear(const int weight [K, N], const scale[, const zp])`` blocked or
    per-channel along K, decode it."""
    dq = value.producer()
    c = read_dq_constants(dq) if dq is not None else None
    if c is None:
        return None
    k, n = c.q.shape
    scale, zp = c.scale, c.zero_point
    if c.block:
        if c.axis != 0 or scale.ndim != 2 or scale.shape[1] != n:
            return None
        group = c.block
    else:
        if c.axis not in (1, -1) or scale.size != n:
            return None
        scale = scale.reshape(1, n)
        zp = zp.reshape(1, n) if zp is not None else None
        group = k
    return DQWeight(dq, c.q, scale, zp, c.bits, c.symmetric, group, c.scale_type)
