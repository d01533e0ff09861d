"""fuse-rmsnorm: RMSNorm subgraphs → ``SimplifiedLayerNormalization``.

    y = γ ⊙ x · 1/√(mean(x², axis=−1) + ε)  ≡  SimplifiedLayerNormalization(x, γ; axis=−1, epsilon=ε)

The subgraph is found by :func:`qcompiler.models.llama.match_rmsnorm` (torch's export
``Pow → ReduceMean → Add ε → Sqrt → Div(1, ·) → Mul(x, ·) → [Cast] → Mul γ`` and the
``Reciprocal`` / ``x·x`` variants).  It is replaced only when it is exactly that
function: ε added *inside* the square root, the mean over the last axis, every Cast
inside the region an identity (same type in and out, so no precision change), every
intermediate value used only inside the region, and γ a constant vector.  A norm
without γ gets γ = 1.  Anything else is left alone and logged.  ORT computes the fused
op in float32 (``stash_type=1``), like the float32 subgraph it replaces.

Half-precision graphs (fp16/bf16) hold the norm as transformers computes it: statistics in
float32 and the normed value narrowed back before γ::

    y = γ ⊙ Cast_h(x₃₂ · 1/√(mean(x₃₂²) + ε)),   x₃₂ = Cast_f32(x_h)

The widening Cast is exact and the fused op keeps its statistics in float32 too, so the only
difference is where the one rounding to the half type happens (after γ instead of before:
≤ 1 ulp of the half type).  That region fuses to ``SimplifiedLayerNormalization(x_h, γ_h)``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import match_rmsnorm

from qcompiler.pipeline import QCPass, register_pass

from ._fusion import (
    cleanup,
    const,
    dims,
    infer_shapes,
    is_closed,
    is_identity_cast,
    new_node,
    record,
    region,
    replace_value,
)

log = logging.getLogger(__name__)

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _widened(match, nodes: list[ir.Node] | None) -> ir.Node | None:
    """The widening ``Cast(x_h → float32)`` of a half-precision norm (module docstring), if the
    region's only other precision change is the one Cast back to x_h's type."""
    cast = match.input.producer()
    if nodes is None or cast is None or cast.op_type != "Cast" or cast.domain != "" or cast.inputs[0] is None:
        return None
    half = cast.inputs[0].dtype
    if half not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) or match.input.dtype != ir.DataType.FLOAT:
        return None
    if any(u.node not in nodes for u in match.input.uses()) or match.input.is_graph_output():
        return None
    changes = [n for n in nodes if n.op_type == "Cast" and not is_identity_cast(n)]
    if len(changes) != 1 or changes[0].attributes.get_int("to", -1) != half.value:
        return None
    return cast


def _why_not(match, nodes: list[ir.Node] | None, graph: ir.Graph, widened: bool = False) -> str | None:
    if nodes is None:
        return "the subgraph reads values other than x and constants"
    if not is_closed(nodes, [match.output], graph):
        return "an intermediate value is used outside the norm"
    if not widened and any(n.op_type in ("Cast", "Identity") and not is_identity_cast(n) for n in nodes):
        return "a Cast inside the norm changes precision"
    if match.input.dtype not in FLOATS:
        return f"input type {match.input.dtype} is not a known float type"
    if match.gamma is not None:
        g = match.gamma.const_value
        if g is None or len(g.shape) != 1 or g.dtype != match.input.dtype:
            return "γ is not a constant vector of the input's type"
        last = (dims(match.input) or [None])[-1]
        if isinstance(last, int) and g.shape[0] != last:
            return f"γ has {g.shape[0]} entries but the input's last axis has {last}"
    elif not isinstance((dims(match.input) or [None])[-1], int):
        return "weightless norm over an axis of unknown size"
    return None


@register_pass
class FuseRMSNorm(QCPass):
    """RMSNorm subgraphs → SimplifiedLayerNormalization (see module docstring)."""

    name = "fuse-rmsnorm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        infer_shapes(model)
        count = 0
        absorbed: set[int] = set()
        # from the end, so that ``γ ⊙ normed`` is matched before its weightless inner ``normed``
        for node in reversed(list(graph)):
            if node.op_type != "Mul" or node.domain != "" or id(node) in absorbed:
                continue
            match = match_rmsnorm(node.outputs[0])
            if match is None or match.fused:
                continue
            nodes = region(match.output, [match.input])
            widen = _widened(match, nodes)
            if widen is not None:  # half-precision norm: fuse from x_h, the two Casts inside
                match = dataclasses.replace(match, input=widen.inputs[0])
                nodes = [widen, *nodes]  # type: ignore[list-item]
            absorbed.update(id(n) for n in nodes or [])
            reason = _why_not(match, nodes, graph, widened=widen is not None)
            if reason is not None:
                log.info("fuse-rmsnorm: RMSNorm at %s left unfused: %s", node.name, reason)
                continue
            gamma = match.gamma
            if gamma is None:
                h = int(dims(match.input)[-1])  # type: ignore[index,arg-type]
                gamma = const(graph, f"{node.name}_ones", np.ones(h, dtype=match.input.dtype.numpy()))
            fused = new_node(
                graph, "SimplifiedLayerNormalization", [match.input, gamma], f"{node.name}_SimplifiedLayerNorm",
                attributes={"axis": -1, "epsilon": float(match.eps), "stash_type": 1},
            )
            graph.insert_before(node, fused)
            replace_value(graph, match.output, fused.outputs[0])
            count += 1
        if count:
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-rmsnorm: %d RMSNorm subgraph(s) → SimplifiedLayerNormalization", count)
        return ir.passes.PassResult(model, modified=count > 0)
