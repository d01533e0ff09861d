"""lower-embeddings: row-blocked embedding ``DequantizeLinear`` → ``GatherBlockQuantized`` + ``MatMulNBits``.

Input (``quantize-embeddings``): ``Ê = DequantizeLinear(q[V, H], s, z, axis=1, block_size=g)``
(or ``axis=0``, one scale per row) read by ``Gather(Ê, ids)`` and/or
``MatMul(x, Transpose(Ê))``.  With ``W = Êᵀ[K=H, N=V]`` the MatMulNBits layout is
column-major over N = V: ``B[V, ⌈H/b⌉, b·bits/8]`` holds row v of q in blocks of b
along H — the byte layout ``GatherBlockQuantized`` (ONNX Runtime, ``com.microsoft``)
reads as ``data[V, ⌈H/b⌉·b·bits/8]`` (``gather_axis=0, quantize_axis=1``, low nibble
first; its scales ``[V, ⌈H/b⌉]``, packed zero points ``[V, ⌈⌈H/b⌉·bits/8⌉]``, absent zero
point = ``2^(bits−1)``, as for MatMulNBits).  So both ops read one initializer::

    B ─ MatMulNBits(x, B, scales, zp, K=H, N=V)                         (logits = x·Êᵀ)
    B ─ Reshape[V, −1] ─ GatherBlockQuantized(·, ids, Reshape(scales), Reshape(zp)) [─ Slice :H]

When H is not a multiple of b, K is padded to ``⌈H/b⌉·b`` with zero-point values (see
``qcompiler.quant.packing``): MatMulNBits ignores the padding (``K`` attribute), the
gathered rows carry it and a ``Slice`` drops it.  Other forms are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.floattype import float_array, float_type
from qcompiler.irutil import MS_DOMAIN, add_initializer, ensure_opset, remove_unused_initializers
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import read_dq_constants
from qcompiler.quant.packing import matmulnbits_block_size, pack_matmulnbits

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LowerEmbeddingsConfig:
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")


@dataclass
class RowBlocked:
    """A row-blocked embedding DequantizeLinear, read back as the lm_head's ``W = Êᵀ`` groups."""

    q: np.ndarray  # [H, V]
    scale: np.ndarray  # [G, V]
    zero_point: np.ndarray | None  # [G, V]
    bits: int
    group: int


def read_row_blocked(dq: ir.Node) -> RowBlocked | None:
    """``dq`` as a table ``[V, H]`` blocked along H (or per row), transposed to MatMulNBits' ``[H, V]``."""
    c = read_dq_constants(dq)
    if c is None:
        return None
    v, h = c.q.shape
    scale, zp = c.scale, c.zero_point
    if c.axis == 1 and c.block and scale.shape == (v, -(-h // c.block)):
        group = c.block
    elif c.axis == 0 and not c.block and scale.size == v:
        group, scale = h, scale.reshape(v, 1)
        zp = None if zp is None else zp.reshape(v, 1)
    else:
        return None
    return RowBlocked(np.ascontiguousarray(c.q.T), np.ascontiguousarray(scale.T),
                      None if zp is None else np.ascontiguousarray(zp.T), c.bits, group)


def _users(dq: ir.Node) -> tuple[list[ir.Node], list[tuple[ir.Node, ir.Node]]] | None:
    """(Gathers of rows, (Transpose, MatMul) pairs) reading ``dq``, or None if anything else reads it."""
    gathers: list[ir.Node] = []
    matmuls: list[tuple[ir.Node, ir.Node]] = []
    out = dq.outputs[0]
    for use in out.uses():
        node = use.node
        if node.op_type == "Gather" and node.domain == "" and use.idx == 0 and node.attributes.get_int("axis", 0) == 0:
            gathers.append(node)
            continue
        if node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            mms = [u for u in node.outputs[0].uses()]
            if mms and all(u.node.op_type == "MatMul" and u.node.domain == "" and u.idx == 1 for u in mms):
                matmuls.extend((node, u.node) for u in mms)
                continue
        return None
    return gathers, matmuls


@register_pass
class LowerEmbeddings(QCPass):
    """Row-blocked embedding DequantizeLinear → GatherBlockQuantized + MatMulNBits (one packed tensor)."""

    name = "lower-embeddings"
    Config = LowerEmbeddingsConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
            rb = read_row_blocked(dq)
            users = _users(dq) if rb is not None else None
            if rb is None or users is None or not (users[0] or users[1]):
                continue
            if rb.bits not in (4, 8):
                log.info("lower-embeddings: %d-bit embedding left as DequantizeLinear", rb.bits)
                continue
            self._lower(graph, dq, rb, *users)
            count += 1
        if count:
            remove_unused_initializers(graph)
            ensure_opset(model, MS_DOMAIN, 1)
        log.info("lower-embeddings: %d embedding tensor(s) → GatherBlockQuantized/MatMulNBits", count)
        return ir.passes.PassResult(model, modified=count > 0)

    def _lower(self, graph: ir.Graph, dq: ir.Node, rb: RowBlocked, gathers: list[ir.Node],
               matmuls: list[tuple[ir.Node, ir.Node]]) -> None:
        k, n = rb.q.shape  # K = H, N = V
        block = matmulnbits_block_size(rb.group, k)
        packed, scales, zps = pack_matmulnbits(rb.q, rb.scale, rb.zero_point, rb.bits, block, rb.group)
        base = dq.name.removesuffix("_DequantizeLinear") if dq.name else "embedding"
        b_val = add_initializer(graph, f"{base}_nbits", packed)
        s_val = add_initializer(graph, f"{base}_nbits_scales", float_array(scales, float_type(dq.inputs[1])))
        z_val = add_initializer(graph, f"{base}_nbits_zp", zps) if zps is not None else None
        for transpose, mm in matmuls:
            inputs = [mm.inputs[0], b_val, s_val] + ([z_val] if z_val is not None else [])
            new = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=(mm.name or base) + "_nbits",
                          attributes={"K": k, "N": n, "bits": rb.bits, "block_size": block,
                                      "accuracy_level": self.config.accuracy_level})
            _take_over(graph, mm, new, [new])
            graph.remove([mm], safe=True)
            if not transpose.outputs[0].uses():
                graph.remove([transpose], safe=True)
        if gathers:
            rows = add_initializer(graph, f"{base}_rows_shape", np.array([n, -1], dtype=np.int64))
            first = gathers[0]
            reshaped = [ir.node("Reshape", [v, rows], name=f"{base}_Reshape_{i}") for i, v in
                        enumerate([b_val, s_val] + ([z_val] if z_val is not None else []))]
            for r in reshaped:  # [N, blocks, bytes] → [N, blocks·bytes], shaped as made (no shape inference later)
                v = r.inputs[0]
                if v is not None and v.shape is not None and all(isinstance(d, int) for d in v.shape):
                    r.outputs[0].shape = ir.Shape([n, int(np.prod(list(v.shape))) // n])
                    r.outputs[0].type = v.type
            graph.insert_before(first, reshaped)
            for g in gathers:
                ins = [reshaped[0].outputs[0], g.inputs[1], reshaped[1].outputs[0]]
                if z_val is not None:
                    ins.append(reshaped[2].outputs[0])
                gbq = ir.node("GatherBlockQuantized", ins, domain=MS_DOMAIN, name=(g.name or base) + "_gbq",
                              attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": rb.bits})
                nodes = [gbq]
                if -(-k // block) * block != k:
                    consts = [add_initializer(graph, f"{base}_slice_{t}", np.array([x], dtype=np.int64))
                              for t, x in (("start", 0), ("end", k), ("axis", -1))]
                    nodes.append(ir.node("Slice", [gbq.outputs[0], *consts], name=(g.name or base) + "_slice"))
                _take_over(graph, g, nodes[-1], nodes)
                graph.remove([g], safe=True)
        if not dq.outputs[0].uses():
            graph.remove([dq], safe=True)


def _take_over(graph: ir.Graph, old: ir.Node, last: ir.Node, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` before ``old`` and give ``last``'s output ``old``'s name, users and type."""
    graph.insert_before(old, nodes)
    new_out, old_out = last.outputs[0], old.outputs[0]
    old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    name, old_out.name = old_out.name, None
    new_out.name = name
    new_out.shape, new_out.type = old_out.shape, old_out.type
    last.meta.update(old.meta)
    last.metadata_props.update(old.metadata_props)
