"""Graph surgery shared by the target lowering passes (not a pass: ``_`` keeps it out of discovery).

A lowering replaces a recognized pattern ending in value ``y`` by new nodes computing
the same function: the new output takes over ``y``'s name, type, shape and uses
(:func:`take_over`), and the pattern's nodes are then removed only if nothing else uses
them (:func:`remove_dead`), so patterns sharing a node with another consumer stay valid.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import add_initializer, const_array, scalar_const


def take_over(new: ir.Value, old: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere (graph outputs too) and takes its name/type/shape."""
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name, old.name = old.name, None
    new.name = name
    if old.shape is not None:
        new.shape = old.shape
    if old.type is not None:
        new.type = old.type


def remove_dead(graph: ir.Graph, nodes: list[ir.Node] | tuple[ir.Node, ...]) -> int:
    """Remove those of ``nodes`` whose outputs nobody uses (repeatedly); returns how many."""
    pending = [n for n in dict.fromkeys(nodes) if n.graph is graph]
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            graph.remove(node, safe=True)  # also detaches its inputs
            pending.remove(node)
            removed += 1
            changed = True
    return removed


def following_bias(y: ir.Value, n: int) -> tuple[np.ndarray, ir.Node] | None:
    """If ``y``'s only consumer is ``Add(y, b)`` with a constant ``b`` of N elements, ``(b, add)``."""
    uses = y.uses()
    if len(uses) != 1 or y.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    b = const_array(other)
    if b is None or b.size != n or (b.ndim > 1 and b.shape[-1] != n) or not np.issubdtype(b.dtype, np.floating):
        return None
    return b.reshape(n).astype(np.float32), add


def base_name(node: ir.Node, fallback: str = "linear") -> str:
    return (node.name or fallback).replace("/", "_").strip("_") or fallback


def float_dtype(*values: ir.Value | None) -> ir.DataType | None:
    """The first known float32/float16 dtype among ``values`` (None if unknown or other)."""
    for v in values:
        if v is not None and v.dtype is not None:
            return v.dtype if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) else None
    return None


def shared_u8_quantize(graph: ir.Graph, q: ir.Node, zero: int, base: str) -> ir.Node:
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
