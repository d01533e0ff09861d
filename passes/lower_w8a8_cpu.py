"""lower-w8a8-cpu: the portable W8A8 forms → ONNX Runtime CPU integer kernels.

Static per-tensor activations, ``X̂ = s_x·(Q(X) − z_x)``, ``Ŵ = s_w·W_q``::

    X̂·Ŵ = s_x·s_w ⊙ ((Q(X) − z_x)·W_q)  =  MatMulIntegerToFloat(Q(X), W_q, s_x, s_w, z_x)

An int8 ``Q(X)`` is re-emitted as uint8 with zero point ``z_x + 128`` (the same value shifted,
exactly: ``clip(round(X/s) + z, −128, 127) + 128 = clip(round(X/s) + z + 128, 0, 255)``).

Dynamic per-token activations, ``X̂ = s·q`` with ``q = clip(round(X/s), −127, 127)``, shifted
to ``u = q + 128 ∈ [1, 255]`` (exact in float, exact as uint8) with zero point 128::

    X̂·Ŵ = s ⊙ (q·W_q)·s_w = s ⊙ ((u − 128)·W_q)·s_w
        = Mul(MatMulIntegerToFloat(Cast(q + 128, uint8), W_q, 1, s_w, 128), s)

(``s`` a column ``[..., 1]`` broadcast over N).  The activations are uint8 because MLAS has
fast kernels for uint8 activations only (int8 × int8 takes a portable C++ path, 6× slower).

The weight is stored as :func:`qcompiler.quant.intgemm.encode_weight` says: with
``cpu_isa=any`` (default) as ``W_u = W_q + 128`` with zero point 128, which is exact::

    (A − z_a)·(W_u − 128) = (A − z_a)·W_q

and runs MLAS's u8×u8 kernel, exact on every ISA.  MLAS's u8×s8 kernel, which an int8
weight would select, sums pairs of products into a saturating int16 on x86 CPUs without
VNNI (``2·255·127 > 32767``: 20% error on this project's AVX2 machine); ``cpu_isa=vnni``
writes int8 weights for users who declare VNNI/AMX/ARM CPUs only (measured here: u8×u8
6.7 ms vs u8×s8 5.0 ms for 512×576·576×1536 on one thread, equal at one row; see
``qcompiler/quant/intgemm.py`` for the table).  A constant bias Add following a static GEMM
folds into MatMulIntegerToFloat's ``bias``.

fp16 graphs: the CPU kernel has float32 scales and output only, so the integer GEMM's float32
result is rescaled in float32 and narrowed once, ``Cast_h(MatMulIntegerToFloat(…) ⊙ Cast_f32(s))``
(the activation's quantization itself runs in fp16: ``QuantizeLinear`` has fp16 kernels, and
``round(x/s)`` is an integer ≤ 127, exact in fp16).  bf16 graphs are left in the portable form
and logged (no bf16 integer kernels on CPU; ``--target cuda`` lowers them to qcompiler's ops).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qcompiler.passes._lowering import (
    base_name,
    float_dtype,
    following_bias,
    remove_dead,
    shared_u8_quantize,
    take_over,
)

from qcompiler.floattype import float_array
from qcompiler.irutil import (
    MS_DOMAIN,
    add_initializer,
    ensure_opset,
    remove_unused_initializers,
    scalar_const,
)
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.intgemm import check_cpu_isa, encode_weight
from qcompiler.quant.w8a8 import W8A8Match, w8a8_matmuls

log = logging.getLogger(__name__)

WEIGHT_FORMS = {"any": "uint8 = int8 + 128, zero point 128 (u8×u8: exact on every CPU)",
                "vnni": "int8 (u8×s8: exact on VNNI/AMX/ARM CPUs only, saturates on AVX2 without VNNI)"}


@dataclass(frozen=True)
class LowerW8A8CpuConfig:
    static: bool = True  # lower static per-tensor W8A8
    per_token: bool = True  # lower dynamic per-token W8A8
    fold_bias: bool = True
    cpu_isa: str = "any"  # any: u8×u8 GEMMs, exact on every CPU | vnni: u8×s8 (VNNI/AMX/ARM CPUs only)

    def __post_init__(self) -> None:
        check_cpu_isa(self.cpu_isa)


@register_pass
class LowerW8A8Cpu(QCPass):
    """Rewrite portable W8A8 MatMuls into com.microsoft.MatMulIntegerToFloat (int8 GEMM on CPU)."""

    name = "lower-w8a8-cpu"
    Config = LowerW8A8CpuConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts: Counter[str] = Counter()
        for m in w8a8_matmuls(graph):
            node = m.matmul
            wdq = node.inputs[1].producer() if node.inputs[1] is not None else None
            ft = float_dtype(m.x, node.outputs[0], wdq.inputs[1] if wdq else None)
            if ft not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                counts[f"{m.kind} left (not float32/float16)"] += 1
                continue
            if m.kind == "static" and self.config.static:
                self._static(graph, m, ft)
                counts["static"] += 1
            elif m.kind == "per-token" and self.config.per_token:
                self._per_token(graph, m, ft)
                counts["per-token"] += 1
        lowered = counts["static"] + counts["per-token"]
        if lowered:
            remove_unused_initializers(graph)
            ensure_opset(model, MS_DOMAIN, 1)
        report: dict[str, object] = dict(counts)
        if lowered:
            report["weights"] = WEIGHT_FORMS[self.config.cpu_isa]
        self.context.report[self.name] = report
        log.info("lower-w8a8-cpu: %s", ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing to lower")
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _weights(self, graph: ir.Graph, m: W8A8Match, base: str) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """The stored weight, its scales and its zero point (None for int8 weights)."""
        w_stored, w_zero = encode_weight(m.w_q, self.config.cpu_isa)
        w = add_initializer(graph, f"{base}_w_{w_stored.dtype}", ir.Tensor(w_stored))
        s = add_initializer(graph, f"{base}_w_scale", m.w_scale.astype(np.float32))
        z = add_initializer(graph, f"{base}_w_zp", w_zero) if w_zero is not None else None
        return w, s, z

    def _static(self, graph: ir.Graph, m: W8A8Match, ft: ir.DataType) -> None:
        q = m.nodes[0]  # QuantizeLinear (the pattern is Q, DQ, weight DQ, MatMul)
        base = base_name(m.matmul)
        w, s_w, z_w = self._weights(graph, m, base)
        s_x = add_initializer(graph, f"{base}_x_scale", np.array(m.x_scale, np.float32))
        if m.x_zero_dtype == "int8":
            # int8 activations take MLAS's slow s8×s8 path: quantize to uint8 with z + 128 instead
            # (clip(round(x/s) + z, −128, 127) + 128 = clip(round(x/s) + z + 128, 0, 255), exactly)
            u8 = shared_u8_quantize(graph, q, int(m.x_zero or 0) + 128, base)
            a, z_x = u8.outputs[0], u8.inputs[2]
        else:
            a = q.outputs[0]
            z_x = add_initializer(graph, f"{base}_x_zp", np.array(m.x_zero, np.uint8))
        y = m.matmul.outputs[0]
        bias = following_bias(y, m.w_q.shape[1]) if self.config.fold_bias else None
        inputs: list[ir.Value | None] = [a, w, s_x, s_w, z_x, z_w]
        if bias is not None:
            inputs.append(add_initializer(graph, f"{base}_bias", bias[0]))
        while inputs[-1] is None:
            inputs.pop()
        node = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=f"{base}_MatMulIntegerToFloat")
        node.meta.update(m.matmul.meta)
        node.metadata_props.update(m.matmul.metadata_props)
        new = [node, *_narrow(node.outputs[0], ft, base)]
        graph.insert_before(m.matmul, new)
        take_over(new[-1].outputs[0], bias[1].outputs[0] if bias else y)
        remove_dead(graph, [*m.nodes, *((bias[1],) if bias else ())])

    def _per_token(self, graph: ir.Graph, m: W8A8Match, ft: ir.DataType) -> None:
        # pattern nodes: Abs, ReduceMax, Max, Div (scale), Div, Round, Clip, Mul, weight DQ, MatMul
        scale_div, clip = m.nodes[3], m.nodes[6]
        base = base_name(m.matmul)
        w, s_w, z_w = self._weights(graph, m, base)
        one = add_initializer(graph, f"{base}_one", np.array(1.0, np.float32))
        zp = add_initializer(graph, f"{base}_x_zp", np.array(128, np.uint8))
        # linears sharing one quantized activation (q/k/v, gate/up) share the shifted uint8 cast too
        cast = _shared_u8_cast(clip)
        new = []
        if cast is None:
            shift = ir.node("Add", [clip.outputs[0], add_initializer(graph, f"{base}_u8_shift", float_array(128.0, ft))],
                            name=f"{base}_u8_shift_Add")
            cast = ir.node("Cast", [shift.outputs[0]], {"to": ir.DataType.UINT8}, name=f"{base}_q_Cast")
            new += [shift, cast]
        gemm_inputs = [cast.outputs[0], w, one, s_w, zp] + ([z_w] if z_w is not None else [])
        gemm = ir.node("MatMulIntegerToFloat", gemm_inputs, domain=MS_DOMAIN,
                       name=f"{base}_MatMulIntegerToFloat")
        row_scale = scale_div.outputs[0]
        if ft != ir.DataType.FLOAT:  # the row scale in float32, the product narrowed once
            widen = ir.node("Cast", [row_scale], {"to": ir.DataType.FLOAT}, name=f"{base}_row_scale_Cast")
            new.append(widen)
            row_scale = widen.outputs[0]
        rescale = ir.node("Mul", [gemm.outputs[0], row_scale], name=f"{base}_row_scale_Mul")
        for n in (gemm, rescale):
            n.meta.update(m.matmul.meta)
            n.metadata_props.update(m.matmul.metadata_props)
        tail = [gemm, rescale, *_narrow(rescale.outputs[0], ft, base)]
        graph.insert_before(m.matmul, [*new, *tail])
        take_over(tail[-1].outputs[0], m.matmul.outputs[0])
        remove_dead(graph, m.nodes)


def _narrow(y: ir.Value, ft: ir.DataType, base: str) -> list[ir.Node]:
    """``[Cast(y → ft)]`` when the graph's float type ``ft`` is not float32 (the kernels' output)."""
    if ft == ir.DataType.FLOAT:
        return []
    return [ir.node("Cast", [y], {"to": ft}, name=f"{base}_out_Cast")]


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

