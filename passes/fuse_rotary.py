"""fuse-rotary: rotary position embedding subgraphs → ``com.microsoft.RotaryEmbedding``.

On ``x[B, N, S, H]`` with ``h = H/2`` and per-position tables ``C, S[B, S, H]``::

    x·C + [−x₂, x₁]·S   with  C = g(Concat(f, f)),  S = g'(Concat(f, f))

where ``g, g'`` are elementwise (``cos``, ``sin``, scalar scaling, casts), so that
``C[..., :h] = C[..., h:] = c`` and likewise ``s``.  Then, per half,

    y₁ = x₁·c − x₂·s,   y₂ = x₂·c + x₁·s

which is ``RotaryEmbedding`` (non-interleaved) reading ``cos_cache[p] = c[b, t]`` at
``p = b·S + t``.  The pass therefore feeds the fused op the graph's own tables,
flattened to ``[B·S, h]``, and positions ``p = arange(B·S)`` reshaped to ``[B, S]``:
the result is bit-for-bit the same function of the graph's inputs for any
``position_ids`` (and any RoPE variant: scaled, NTK, YaRN), with no maximum length.
The tables are built once per model and shared by all layers.  Subgraphs that don't
match exactly (other layouts, partial rotary, interleaved pairs, a table that is not
two equal halves) are left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import RotaryMatch, match_rotary

from qcompiler.irutil import MS_DOMAIN, ensure_opset
from qcompiler.pipeline import QCPass, register_pass

from ._fusion import cleanup, const, infer_shapes, is_closed, new_node, record, replace_value

log = logging.getLogger(__name__)

#: ``graph.meta`` key: (cos table, sin table) → (positions, cos_cache, sin_cache)
CACHE_KEY = "qc.rotary_caches"


def _caches(graph: ir.Graph, m: RotaryMatch, anchor: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Positions ``[B, S]`` and the flattened half tables, built once per pair of tables."""
    caches: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = graph.meta.setdefault(CACHE_KEY, {})
    key = (id(m.cos), id(m.sin))
    if key in caches:
        return caches[key]
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value | None], name: str, **attrs: object) -> ir.Value:
        n = new_node(graph, op, inputs, f"/rotary_fused/{name}", attributes=attrs)
        nodes.append(n)
        return n.outputs[0]

    zero, one = const(graph, "rotary_zero", np.array([0], np.int64)), const(graph, "rotary_one", np.array(1, np.int64))
    half = const(graph, "rotary_half", np.array([m.half], np.int64))
    last = const(graph, "rotary_last_axis", np.array([-1], np.int64))
    flat = const(graph, "rotary_flat_shape", np.array([-1, m.half], np.int64))
    bs = add("Shape", [m.cos], "table_shape", start=0, end=2)  # [B_t, S]
    count = add("ReduceProd", [bs], "table_rows", keepdims=0)
    rows = add("Range", [const(graph, "rotary_zero_scalar", np.array(0, np.int64)), count, one], "rows")
    pos = add("Reshape", [rows, bs], "positions")
    # tables may be shared over the batch ([1, S, H]): broadcast positions to x's batch
    xb = add("Shape", [m.x], "x_batch", start=0, end=1)
    target = add("Concat", [xb, add("Shape", [m.cos], "table_seq", start=1, end=2)], "positions_shape", axis=0)
    pos = add("Expand", [pos, target], "positions_expanded")
    out = [pos]
    for tag, table in (("cos", m.cos), ("sin", m.sin)):
        sliced = add("Slice", [table, zero, half, last], f"{tag}_half")
        out.append(add("Reshape", [sliced, flat], f"{tag}_cache"))
    graph.insert_before(anchor, nodes)
    caches[key] = (out[0], out[1], out[2])
    return caches[key]


@register_pass
class FuseRotary(QCPass):
    """Rotary position embedding subgraphs → com.microsoft.RotaryEmbedding (see module docstring)."""

    name = "fuse-rotary"
    needs_canonical = True  # canonicalize must see the unfused decoder (QCPass.needs_canonical)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        infer_shapes(model)
        graph.meta[CACHE_KEY] = {}
        count = 0
        for node in list(graph):
            if node.op_type != "Add" or node.domain != "" or node.graph is None:
                continue
            m = match_rotary(node.outputs[0])
            if m is None:
                continue
            if not is_closed(m.nodes, [m.output], graph):
                log.info("fuse-rotary: rotary at %s left unfused: an intermediate value is used elsewhere", node.name)
                continue
            if m.x.dtype is None or m.x.dtype != m.cos.dtype or m.x.dtype != m.sin.dtype:
                log.info("fuse-rotary: rotary at %s left unfused: tables and input differ in type", node.name)
                continue
            pos, cos_cache, sin_cache = _caches(graph, m, node)
            fused = new_node(graph, "RotaryEmbedding", [m.x, pos, cos_cache, sin_cache], f"{node.name}_RotaryEmbedding",
                             attributes={"interleaved": 0}, domain=MS_DOMAIN)
            graph.insert_before(node, fused)
            replace_value(graph, m.output, fused.outputs[0])
            count += 1
        graph.meta.pop(CACHE_KEY, None)
        if count:
            ensure_opset(model, MS_DOMAIN, 1)
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-rotary: %d rotary subgraph(s) → RotaryEmbedding", count)
        return ir.passes.PassResult(model, modified=count > 0)
