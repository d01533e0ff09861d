"""lower-w8a8-cpu: the portable W8A8 forms → ONNX Runtime CPU integer kernels.

Static per-tensor activations, ``X̂ = s_x·(Q(X) − z_x)``, ``Ŵ = s_w·W_q``::

    X̂·Ŵ = s_x·s_w ⊙ ((Q(X) − z_x)·W_q)  =  MatMulIntegerToFloat(Q(X), W_q, s_x, s_w, z_x)

An int8 ``Q(X)`` is re-emitted as uint8 with zero point ``z_x + 128`` (the same value shifted,
exactly: ``clip(round(X/s) + z, −128, 127) + 128 = clip(round(X/s) + z + 128, 0, 255)``).

Dynamic per-token activations, ``X̂ = s·q`` with ``q = clip(round(X/s), −127, 127)``, shifted
to ``u = q + 128 ∈ [1, 255]`` (exact in float, exact as uint8) with zero point 128::

    X̂·Ŵ = s ⊙ (q·W_q)·s_w = s ⊙ ((u − 128)·W_q)·s_w
        = Mul(MatMulIntegerToFloat(Cast(q + 128, uint8), W_q, 1, s_w, 128), s)

(``s`` a column ``[..., 1]`` broadcast over N).  The shift is for speed: ONNX Runtime's CPU
GEMM (MLAS) has fast kernels for uint8 activations × int8 weights; int8 × int8 takes a slow
path (measured 2.9 ms vs 124 ms for a 512×576·576×1536 product, one thread, AVX-512 VNNI).  Both keep the integer product in int32
inside ONNX Runtime's CPU GEMM; a constant bias Add following a static GEMM folds into
MatMulIntegerToFloat's ``bias``.  Only float32 graphs are lowered (the CPU kernel has
float32 scales); others are left in the portable form and logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qcompiler.passes._lowering import base_name, float_dtype, following_bias, remove_dead, take_over

from qcompiler.irutil import (
    MS_DOMAIN,
    add_initializer,
    ensure_opset,
    remove_unused_initializers,
    scalar_const,
)
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.w8a8 import W8A8Match, match_w8a8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowerW8A8CpuConfig:
    static: bool = True  # lower static per-tensor W8A8
    per_token: bool = True  # lower dynamic per-token W8A8
    fold_bias: bool = True


@register_pass
class LowerW8A8Cpu(QCPass):
    """Rewrite portable W8A8 MatMuls into com.microsoft.MatMulIntegerToFloat (int8 GEMM on CPU)."""

    name = "lower-w8a8-cpu"
    Config = LowerW8A8CpuConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts: Counter[str] = Counter()
        for node in list(graph):
            if node.graph is not graph or node.op_type != "MatMul":
                continue
            m = match_w8a8(node)
            if m is None:
                continue
            wdq = node.inputs[1].producer() if node.inputs[1] is not None else None
            if float_dtype(m.x, node.outputs[0], wdq.inputs[1] if wdq else None) != ir.DataType.FLOAT:
                counts[f"{m.kind} left (not float32)"] += 1
                continue
            if m.kind == "static" and self.config.static:
                self._static(graph, m)
                counts["static"] += 1
            elif m.kind == "per-token" and self.config.per_token:
                self._per_token(graph, m)
                counts["per-token"] += 1
        lowered = counts["static"] + counts["per-token"]
        if lowered:
            remove_unused_initializers(graph)
            ensure_opset(model, MS_DOMAIN, 1)
        self.context.report[self.name] = dict(counts)
        log.info("lower-w8a8-cpu: %s", ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing to lower")
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _weights(self, graph: ir.Graph, m: W8A8Match, base: str) -> tuple[ir.Value, ir.Value]:
        w = add_initializer(graph, f"{base}_w_int8", ir.Tensor(np.ascontiguousarray(m.w_q, np.int8)))
        s = add_initializer(graph, f"{base}_w_scale", m.w_scale.astype(np.float32))
        return w, s

    def _static(self, graph: ir.Graph, m: W8A8Match) -> None:
        q = m.nodes[0]  # QuantizeLinear (the pattern is Q, DQ, weight DQ, MatMul)
        base = base_name(m.matmul)
        w, s_w = self._weights(graph, m, base)
        s_x = add_initializer(graph, f"{base}_x_scale", np.array(m.x_scale, np.float32))
        if m.x_zero_dtype == "int8":
            # int8 activations take MLAS's slow s8×s8 path: quantize to uint8 with z + 128 instead
            # (clip(round(x/s) + z, −128, 127) + 128 = clip(round(x/s) + z + 128, 0, 255), exactly)
            u8 = _shared_u8_quantize(graph, q, int(m.x_zero or 0) + 128, base)
            a, z_x = u8.outputs[0], u8.inputs[2]
        else:
            a = q.outputs[0]
            z_x = add_initializer(graph, f"{base}_x_zp", np.array(m.x_zero, np.uint8))
        y = m.matmul.outputs[0]
        bias = following_bias(y, m.w_q.shape[1]) if self.config.fold_bias else None
        inputs: list[ir.Value | None] = [a, w, s_x, s_w, z_x]
        if bias is not None:
            inputs += [None, add_initializer(graph, f"{base}_bias", bias[0])]
        node = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=f"{base}_MatMulIntegerToFloat")
        node.meta.update(m.matmul.meta)
        node.metadata_props.update(m.matmul.metadata_props)
        graph.insert_before(m.matmul, node)
        take_over(node.outputs[0], bias[1].outputs[0] if bias else y)
        remove_dead(graph, [*m.nodes, *((bias[1],) if bias else ())])

    def _per_token(self, graph: ir.Graph, m: W8A8Match) -> None:
        # pattern nodes: Abs, ReduceMax, Max, Div (scale), Div, Round, Clip, Mul, weight DQ, MatMul
        scale_div, clip = m.nodes[3], m.nodes[6]
        base = base_name(m.matmul)
        w, s_w = self._weights(graph, m, base)
        one = add_initializer(graph, f"{base}_one", np.array(1.0, np.float32))
        zp = add_initializer(graph, f"{base}_x_zp", np.array(128, np.uint8))
        # linears sharing one quantized activation (q/k/v, gate/up) share the shifted uint8 cast too
        cast = _shared_u8_cast(clip)
        new = []
        if cast is None:
            shift = ir.node("Add", [clip.outputs[0], add_initializer(graph, f"{base}_u8_shift", np.array(128.0, np.float32))],
                            name=f"{base}_u8_shift_Add")
            cast = ir.node("Cast", [shift.outputs[0]], {"to": ir.DataType.UINT8}, name=f"{base}_q_Cast")
            new += [shift, cast]
        gemm = ir.node("MatMulIntegerToFloat", [cast.outputs[0], w, one, s_w, zp], domain=MS_DOMAIN,
                       name=f"{base}_MatMulIntegerToFloat")
        rescale = ir.node("Mul", [gemm.outputs[0], scale_div.outputs[0]], name=f"{base}_row_scale_Mul")
        for n in (gemm, rescale):
            n.meta.update(m.matmul.meta)
            n.metadata_props.update(m.matmul.metadata_props)
        graph.insert_before(m.matmul, [*new, gemm, rescale])
        take_over(rescale.outputs[0], m.matmul.outputs[0])
        remove_dead(graph, m.nodes)


def _shared_u8_quantize(graph: ir.Graph, q: ir.Node, zero: int, base: str) -> ir.Node:
    """A uint8 ``QuantizeLinear`` of ``q``'s activation and scale with zero point ``zero``: the one
    an earlier linear of the same activation (q/k/v, gate/up) wrote, or a new one."""
    for use in q.inputs[0].uses():
        n = use.node
        if (n.op_type == "QuantizeLinear" and len(n.inputs) == 3 and n.inputs[1] is q.inputs[1]
                and n.inputs[2] is not None and n.inputs[2].dtype == ir.DataType.UINT8
                and scalar_const(n.inputs[2]) == zero):
            return n
    zp = add_initializer(graph, f"{base}_x_zp_u8", np.array(zero, np.uint8))
    node = ir.node("QuantizeLinear", [q.inputs[0], q.inputs[1], zp], name=f"{q.name or base}_u8")
    node.outputs[0].name = f"{q.name or base}_u8_out"
    graph.insert_before(q, node)
    return node


def _shared_u8_cast(clip: ir.Node) -> ir.Node | None:
    """The ``Cast(Clip(...) + 128, uint8)`` an earlier linear of the same activation wrote, if any."""
    for use in clip.outputs[0].uses():
        add = use.node
        if add.op_type != "Add" or scalar_const(add.inputs[1]) != 128.0:
            continue
        for u in add.outputs[0].uses():
            if u.node.op_type == "Cast" and u.node.attributes.get_int("to", 0) == ir.DataType.UINT8:
                return u.node
    return None

