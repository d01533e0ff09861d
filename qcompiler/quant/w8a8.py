"""The portable (canonical) W8A8 forms, how to emit them and how to recognize them.

Every W8A8 pass writes one of these standard-ONNX (opset 21) forms; every W8A8
lowering (ORT CPU integer ops, qcompiler's custom ops, NPU) reads them through
:func:`match_w8a8`, so producers and consumers agree on one definition.

Weight (symmetric int8, per output channel)::

    Ŵ = DequantizeLinear(W_q: int8 [K, N], s_w: float [N], axis=1)

Static per-tensor activation (``kind="static"``; int8 or uint8 with zero point)::

    X̂ = DequantizeLinear(QuantizeLinear(X, s_x, z_x), s_x, z_x)          s_x, z_x scalars

Dynamic per-token activation (``kind="per-token"``; symmetric int8, one scale per row)::

    a  = ReduceMax(Abs(X), axes=[-1], keepdims=1)      # row abs-max       [..., 1]
    s  = Div(Max(a, ε), 127)                           # row scale
    X̂  = Mul(Clip(Round(Div(X, s)), −127, 127), s)     # integer-valued rows × scale

and in both cases ``Y = MatMul(X̂, Ŵ)`` (optionally ``+ bias`` by a following Add).
The MatMul carries ``metadata_props["qc.quant"] = "w8a8-static" | "w8a8-per-token"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.errors import CalibrationError, QCError
from qcompiler.floattype import float_array, float_type, graph_float_type
from qcompiler.irutil import add_initializer, const_array, scalar_const

QUANT_KEY = "qc.quant"
PER_TOKEN_EPS = 1e-8
#: fp16 cannot hold 1e-8 (nor ε/127 for ε < 127·2⁻²⁴): rows with |x| ≤ 1e-4 are zero rows there.
PER_TOKEN_EPS_FP16 = 1e-4
#: the first opset whose ``Round`` accepts bf16 (the per-token form of a bf16 graph needs it)
BF16_ROUND_OPSET = 22


@dataclass(frozen=True)
class W8A8Match:
    """A recognized W8A8 MatMul.

    ``x`` is the float activation before quantization, ``w_q``/``w_scale`` the int8
    weight and its per-column scales.  For ``kind == "static"`` ``x_scale``/``x_zero``
    are the activation's scalar scale and zero point (``x_zero_dtype`` int8 or uint8).
    ``nodes`` are the nodes of the pattern (activation quantization, weight DQ, MatMul)
    that a lowering replaces.
    """

    kind: str  # "static" | "per-token"
    matmul: ir.Node
    x: ir.Value
    w_q: np.ndarray  # int8 [K, N]
    w_scale: np.ndarray  # float32 [N]
    x_scale: float | None = None
    x_zero: int | None = None
    x_zero_dtype: str | None = None  # "int8" | "uint8"
    nodes: tuple[ir.Node, ...] = ()


def _check_finite(scale: np.ndarray, what: str) -> None:
    """Never write a NaN/Inf scale (it would silently turn the layer's output into NaN)."""
    if not np.isfinite(scale).all():
        raise QCError(f"{what}: non-finite quantization scale (NaN/Inf in the weight or its statistics)")


def _node(graph: ir.Graph, op: str, inputs: list[ir.Value | None], name: str, **attrs: object) -> ir.Node:
    n = ir.node(op, inputs, attributes=attrs, name=name)
    n.outputs[0].name = f"{name}_out"
    return n


def emit_int8_weight(graph: ir.Graph, matmul: ir.Node, w_q: np.ndarray, w_scale: np.ndarray, base: str) -> ir.Node:
    """Replace MatMul input 1 by ``DequantizeLinear(W_q, s_w, axis=1)``; returns the DQ node."""
    _check_finite(w_scale, f"{base} weight")
    old = matmul.inputs[1]
    q = add_initializer(graph, f"{base}_q8", ir.Tensor(w_q.astype(np.int8)))
    s = add_initializer(graph, f"{base}_scale", float_array(w_scale.reshape(-1), float_type(old, matmul.outputs[0], default=graph_float_type(graph))))
    dq = _node(graph, "DequantizeLinear", [q, s], f"{base}_DequantizeLinear", axis=1)
    graph.insert_before(matmul, dq)
    matmul.replace_input_with(1, dq.outputs[0])
    if old is not None and not old.uses() and old.name in graph.initializers:
        del graph.initializers[old.name]
    return dq


def emit_static_activation(
    graph: ir.Graph, matmul: ir.Node, scale: float, zero_point: int, dtype: str, base: str
) -> list[ir.Node]:
    """Insert ``QuantizeLinear → DequantizeLinear`` on MatMul input 0 (per-tensor)."""
    _check_finite(np.asarray(scale), f"{base} activation")
    x = matmul.inputs[0]
    np_dtype = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16}[dtype]
    s = add_initializer(graph, f"{base}_x_scale", float_array(scale, float_type(x, matmul.outputs[0], default=graph_float_type(graph))))
    z = add_initializer(graph, f"{base}_x_zp", np.array(zero_point, dtype=np_dtype))
    qn = _node(graph, "QuantizeLinear", [x, s, z], f"{base}_QuantizeLinear")
    dqn = _node(graph, "DequantizeLinear", [qn.outputs[0], s, z], f"{base}_x_DequantizeLinear")
    graph.insert_before(matmul, [qn, dqn])
    matmul.replace_input_with(0, dqn.outputs[0])
    matmul.metadata_props[QUANT_KEY] = "w8a8-static"
    return [qn, dqn]


def emit_per_token_activation(graph: ir.Graph, matmul: ir.Node, base: str) -> list[ir.Node]:
    """Insert the dynamic per-token symmetric int8 fake-quantization on MatMul input 0."""
    x = matmul.inputs[0]
    ft = float_type(x, matmul.outputs[0], default=graph_float_type(graph))
    if ft == ir.DataType.BFLOAT16 and graph.opset_imports.get("", 0) < BF16_ROUND_OPSET:
        graph.opset_imports[""] = BF16_ROUND_OPSET  # Round takes bf16 from opset 22 on
    axes = add_initializer(graph, f"{base}_axes", np.array([-1], dtype=np.int64))
    eps = add_initializer(graph, f"{base}_eps", float_array(PER_TOKEN_EPS_FP16 if ft == ir.DataType.FLOAT16 else PER_TOKEN_EPS, ft))
    q127 = add_initializer(graph, f"{base}_127", float_array(127.0, ft))
    lo = add_initializer(graph, f"{base}_lo", float_array(-127.0, ft))
    hi = add_initializer(graph, f"{base}_hi", float_array(127.0, ft))
    n_abs = _node(graph, "Abs", [x], f"{base}_pt_Abs")
    n_max = _node(graph, "ReduceMax", [n_abs.outputs[0], axes], f"{base}_pt_ReduceMax", keepdims=1)
    n_clamp = _node(graph, "Max", [n_max.outputs[0], eps], f"{base}_pt_Max")
    n_scale = _node(graph, "Div", [n_clamp.outputs[0], q127], f"{base}_pt_Scale")
    n_div = _node(graph, "Div", [x, n_scale.outputs[0]], f"{base}_pt_Div")
    n_round = _node(graph, "Round", [n_div.outputs[0]], f"{base}_pt_Round")
    n_clip = _node(graph, "Clip", [n_round.outputs[0], lo, hi], f"{base}_pt_Clip")
    n_mul = _node(graph, "Mul", [n_clip.outputs[0], n_scale.outputs[0]], f"{base}_pt_Mul")
    nodes = [n_abs, n_max, n_clamp, n_scale, n_div, n_round, n_clip, n_mul]
    if x.shape is not None:  # shaped as made: the fusions after the lowering need no shape inference
        row = ir.Shape([*list(x.shape)[:-1], 1]) if len(x.shape) else None
        for n in nodes:
            n.outputs[0].type = ir.TensorType(ft)
            n.outputs[0].shape = row if n in (n_max, n_clamp, n_scale) else x.shape
    graph.insert_before(matmul, nodes)
    matmul.replace_input_with(0, n_mul.outputs[0])
    matmul.metadata_props[QUANT_KEY] = "w8a8-per-token"
    return nodes


def _match_weight(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray, ir.Node] | None:
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    qv, sv = dq.inputs[0], dq.inputs[1]
    if qv is None or qv.const_value is None or sv is None or sv.const_value is None:
        return None
    if qv.const_value.dtype != ir.DataType.INT8 or len(qv.const_value.shape) != 2:
        return None
    if dq.attributes.get_int("axis", 1) not in (1, -1) or dq.attributes.get_int("block_size", 0):
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zp = const_array(dq.inputs[2])
        if zp is None or np.any(zp != 0):
            return None
    scale = sv.const_value.numpy().astype(np.float32).reshape(-1)
    n = qv.const_value.shape[1]
    if scale.size == 1:
        scale = np.full(n, scale[0], dtype=np.float32)
    if scale.size != n:
        return None
    return qv.const_value.numpy().astype(np.int8), scale, dq


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op else None


def _match_per_token(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    mul = _producer(value, "Mul")
    if mul is None:
        return None
    clip = _producer(mul.inputs[0], "Clip")
    scale_v = mul.inputs[1]
    rnd = _producer(clip.inputs[0], "Round") if clip is not None else None
    div = _producer(rnd.inputs[0], "Div") if rnd is not None else None
    if div is None or div.inputs[1] is not scale_v:
        return None
    if scalar_const(clip.inputs[1]) != -127.0 or scalar_const(clip.inputs[2]) != 127.0:
        return None
    sdiv = _producer(scale_v, "Div")
    mx = _producer(sdiv.inputs[0], "Max") if sdiv is not None else None
    rmax = _producer(mx.inputs[0], "ReduceMax") if mx is not None else None
    ab = _producer(rmax.inputs[0], "Abs") if rmax is not None else None
    if ab is None or scalar_const(sdiv.inputs[1]) != 127.0:
        return None
    x = div.inputs[0]
    if ab.inputs[0] is not x:
        return None
    axes = const_array(rmax.inputs[1]) if len(rmax.inputs) > 1 else None
    if axes is None or list(axes.reshape(-1)) != [-1] or rmax.attributes.get_int("keepdims", 1) != 1:
        return None
    return x, [ab, rmax, mx, sdiv, div, rnd, clip, mul]  # type: ignore[list-item]


def _match_static(value: ir.Value) -> tuple[ir.Value, float, int, str, list[ir.Node]] | None:
    dq = _producer(value, "DequantizeLinear")
    q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    if q is None:
        return None
    s, z = scalar_const(q.inputs[1]), q.inputs[2] if len(q.inputs) > 2 else None
    zs = const_array(z) if z is not None else np.array(0, dtype=np.uint8)
    if s is None or zs is None or zs.size != 1 or zs.dtype not in (np.int8, np.uint8):
        return None  # (a 16-bit activation is no W8A8 form: the lowerings leave it as QDQ)
    if scalar_const(dq.inputs[1]) != s:
        return None
    dt = "int8" if zs.dtype == np.int8 else "uint8"
    return q.inputs[0], float(s), int(zs.reshape(())), dt, [q, dq]


def match_w8a8(matmul: ir.Node) -> W8A8Match | None:
    """Recognize one of the canonical W8A8 forms ending in ``matmul``; None otherwise."""
    if matmul.op_type != "MatMul" or matmul.domain != "":
        return None
    w = _match_weight(matmul.inputs[1])
    if w is None or matmul.inputs[0] is None:
        return None
    w_q, w_scale, wdq = w
    pt = _match_per_token(matmul.inputs[0])
    if pt is not None:
        x, nodes = pt
        return W8A8Match("per-token", matmul, x, w_q, w_scale, nodes=(*nodes, wdq, matmul))
    st = _match_static(matmul.inputs[0])
    if st is not None:
        x, s, z, dt, nodes = st
        return W8A8Match("static", matmul, x, w_q, w_scale, s, z, dt, nodes=(*nodes, wdq, matmul))
    return None


def w8a8_matmuls(graph: ir.Graph) -> Iterator[W8A8Match]:
    """The W8A8 forms ending in ``graph``'s own MatMuls (not its subgraphs'), each matched when the
    iteration reaches it, over a snapshot of the nodes: the caller may rewrite one before the next."""
    for node in list(graph):
        if node.graph is graph and node.op_type == "MatMul":
            m = match_w8a8(node)
            if m is not None:
                yield m


def reference_per_token_matmul(x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """numpy reference of the per-token form: ``(round(x/s_row)·s_row) @ (W_q·s_w)``."""
    x = x.astype(np.float32)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), PER_TOKEN_EPS) / 127.0
    xq = np.clip(np.rint(x / s), -127, 127)
    return ((xq @ w_q.astype(np.float32)) * s * w_scale).astype(np.float32)


# ----------------------------------------------------------------------------- static activation parameters

#: integer grid of a static activation: (dtype, symmetric) → (qmin, qmax, zero point if fixed)
_GRIDS: dict[tuple[str, bool], tuple[int, int, int | None]] = {
    ("int8", True): (-127, 127, 0),
    ("int8", False): (-128, 127, None),
    ("uint8", True): (1, 255, 128),
    ("uint8", False): (0, 255, None),
    # 16-bit activations (insert-qdq's fallback_dtype=int16: A16W8 for the inputs 8 bits cannot hold)
    ("int16", True): (-32767, 32767, 0),
}
RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


def static_qparams(lo: float, hi: float, dtype: str = "int8", symmetric: bool = True) -> tuple[float, int]:
    """Scale and zero point of a static per-tensor activation with range ``[lo, hi]``.

    symmetric: ``s = max(|lo|, |hi|)/127``, ``z = 0`` (int8) or ``128`` (uint8); int16: ``/32767``, ``z = 0``;
    asymmetric: the range is widened to contain 0, ``s = (hi − lo)/(qmax − qmin)``,
    ``z = clamp(round(qmin − lo/s))`` so that 0 is exactly representable.
    """
    if (dtype, symmetric) not in _GRIDS:
        raise ValueError(f"activation dtype must be int8 or uint8 (or symmetric int16), got {dtype}")
    qmin, qmax, fixed_z = _GRIDS[(dtype, symmetric)]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CalibrationError(f"activation range [{lo}, {hi}] is not finite (NaN/Inf in the statistics)")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        scale = max(-lo, hi) / float(qmax - fixed_z)  # type: ignore[operator]
        return (scale if scale > 0 else 1.0), int(fixed_z)  # type: ignore[arg-type]
    scale = (hi - lo) / float(qmax - qmin)
    if scale <= 0:
        return 1.0, int(np.clip(0, qmin, qmax))
    zero = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return scale, zero


def activation_range(
    method: str,
    minmax: tuple[float, float],
    histogram: object | None = None,
    percentile: float = 99.99,
    symmetric: bool = True,
) -> tuple[float, float]:
    """``[lo, hi]`` of a static activation from calibration statistics.

    ``minmax`` is the observed ``(min, max)``; ``histogram`` a
    :class:`qcompiler.calibrate.Histogram` (needed for the clipping methods):
    ``percentile`` keeps the ``p``-th percentile (of ``|x|`` when symmetric, of each tail
    otherwise); ``entropy``/``mse`` are TensorRT's KL threshold and the MSE-optimal
    threshold for 8 bits, intersected with the observed range.
    """
    lo, hi = float(minmax[0]), float(minmax[1])
    if method == "minmax":
        return lo, hi
    if histogram is None:
        raise ValueError(f"range method '{method}' needs a histogram")
    if method == "percentile":
        if symmetric:
            t = histogram.percentile(percentile)  # type: ignore[attr-defined]
            return max(lo, -t), min(hi, t)
        plo, phi = histogram.percentile_range(percentile)  # type: ignore[attr-defined]
        return max(lo, plo), min(hi, phi)
    if method == "entropy":
        _, t = histogram.entropy_range(8)  # type: ignore[attr-defined]
    elif method == "mse":
        _, t = histogram.mse_range(8)  # type: ignore[attr-defined]
    else:
        raise ValueError(f"unknown range method '{method}'; choose one of {', '.join(RANGE_METHODS)}")
    return max(lo, -t), min(hi, t)


def attach_activation(matmul: ir.Node, quantized: ir.Value, kind: str) -> None:
    """Make ``matmul`` read an already emitted quantized activation (linears sharing an input)."""
    matmul.replace_input_with(0, quantized)
    matmul.metadata_props[QUANT_KEY] = f"w8a8-{kind}"


def reference_static_matmul(
    x: np.ndarray, scale: float, zero_point: int, dtype: str, w_q: np.ndarray, w_scale: np.ndarray
) -> np.ndarray:
    """numpy reference of the static form: ``s_x·(clamp(round(x/s_x) + z) − z) @ (W_q·s_w)``."""
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    xq = np.clip(np.rint(x.astype(np.float32) / np.float32(scale)) + zero_point, lo, hi) - zero_point
    return ((xq * np.float32(scale)) @ (w_q.astype(np.float32) * w_scale)).astype(np.float32)
