"""Write qcompiler's custom ops into a graph, and the portable outlier-split form they lower.

``qcompiler.W8A8MatMul`` (per-token W8A8 GEMM)::

    Y = W8A8MatMul(A: T[..., K], B: int8[N, K], b_scale: float[N], bias?: float[N])

``qcompiler.W8A8OutlierMatMul`` (LLM.int8-style outlier-split GEMM)::

    Y = W8A8OutlierMatMul(A: T[..., K], B: int8[N, K], b_scale: float[N],
                          outlier_idx: int64[R], B_outlier: float[R, N], bias?: float[N])

    int8 part:  per-token quantization of A with the channels ``outlier_idx`` left out
                of the row scale and zeroed; ``B``'s columns ``outlier_idx`` are zero.
    float part: ``A[..., outlier_idx] @ B_outlier`` (the outlier rows of the float W).

T is float32, float16 or bfloat16 (Y has A's type); numerics in :mod:`qcompiler.ops.reference`.
Both ops have CPU kernels; the CUDA library adds CUDA kernels.

The portable (standard ONNX, opset 21) outlier-split form, written by
:func:`emit_outlier_split` and recognized by :func:`match_outlier_split`, is::

    X ─┬─ Mul(X, keep[K]) ─ per-token fake-quant ─ MatMul(·, DQ(W_q[K, N], s_w, axis=1)) ─┐
       └─ Gather(X, idx[R], axis=−1) ─ MatMul(·, W_o[R, N]) ─────────────────────────── Add ─ Y

with ``keep`` 0 on the outlier channels and 1 elsewhere, ``W_q``'s outlier rows zero,
the per-token subgraph exactly :func:`qcompiler.quant.w8a8.emit_per_token_activation`'s,
and the Add tagged ``metadata_props["qc.quant"] = "w8a8-outlier-split"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.coverage import OUTLIER_SIDE, mark_kept_float
from qcompiler.floattype import float_array, float_type, graph_float_type
from qcompiler.irutil import QC_DOMAIN, add_initializer, const_array, gather_channels, linear_weight
from qcompiler.quant.w8a8 import QUANT_KEY, W8A8Match, emit_int8_weight, emit_per_token_activation, match_w8a8

W8A8_OP = "W8A8MatMul"
OUTLIER_OP = "W8A8OutlierMatMul"
OUTLIER_SPLIT = "w8a8-outlier-split"
OP_VERSION = 1


def _out_like(node: ir.Node, old: ir.Value) -> None:
    """Give ``node``'s output the name, type and shape of ``old``, and take over its uses."""
    new = node.outputs[0]
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name, old.name = old.name, None
    new.name = name
    new.shape, new.type = old.shape, old.type


def make_qc_gemm(
    graph: ir.Graph,
    x: ir.Value,
    w_q: np.ndarray,
    w_scale: np.ndarray,
    base: str,
    bias: np.ndarray | None = None,
    outlier_idx: np.ndarray | None = None,
    w_outlier: np.ndarray | None = None,
) -> ir.Node:
    """A new (not yet inserted) ``W8A8MatMul``/``W8A8OutlierMatMul`` node on ``x``.

    ``w_q`` is int8 ``[K, N]`` (the portable orientation; stored transposed as ``[N, K]``),
    ``w_scale`` ``[N]``; with ``outlier_idx`` (``[R]``) and ``w_outlier`` (float ``[R, N]``)
    the outlier-split op is made and ``w_q``'s outlier rows are zeroed.
    """
    k, n = w_q.shape
    w_nk = np.ascontiguousarray(np.asarray(w_q, np.int8).T)
    inputs: list[ir.Value | None] = [x]
    if outlier_idx is not None:
        idx = np.asarray(outlier_idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= k or len(set(idx.tolist())) != idx.size):
            raise ValueError(f"outlier indices must be distinct channels in [0, {k})")
        wo = np.asarray(w_outlier, np.float32).reshape(idx.size, n)
        w_nk = w_nk.copy()
        w_nk[:, idx] = 0
    inputs.append(add_initializer(graph, f"{base}_qc_w", ir.Tensor(w_nk)))
    inputs.append(add_initializer(graph, f"{base}_qc_scale", np.asarray(w_scale, np.float32).reshape(n)))
    if outlier_idx is not None:
        inputs.append(add_initializer(graph, f"{base}_qc_idx", idx))
        inputs.append(add_initializer(graph, f"{base}_qc_w_outlier", wo))
    if bias is not None:
        inputs.append(add_initializer(graph, f"{base}_qc_bias", np.asarray(bias, np.float32).reshape(n)))
    op = W8A8_OP if outlier_idx is None else OUTLIER_OP
    return ir.node(op, inputs, domain=QC_DOMAIN, name=f"{base}_{op}")


def emit_outlier_split(
    graph: ir.Graph,
    matmul: ir.Node,
    w_q: np.ndarray,
    w_scale: np.ndarray,
    outlier_idx: np.ndarray,
    w_outlier: np.ndarray,
    *,
    base: str | None = None,
    custom_op: bool = False,
) -> list[ir.Node]:
    """Replace the float linear ``matmul`` (``MatMul(X, W)``) by an outlier-split GEMM.

    ``w_q`` int8 ``[K, N]`` and ``w_scale`` ``[N]`` quantize W's non-outlier rows (the
    outlier rows of ``w_q`` are zeroed here), ``outlier_idx`` int ``[R]`` are the outlier
    input channels and ``w_outlier`` float ``[R, N]`` W's rows for them.  With
    ``custom_op=False`` the portable standard-ONNX form (module docstring) is written, which
    every target runs and ``lower-qc-ops`` turns into the op on cuda; with ``custom_op=True``
    one ``qcompiler.W8A8OutlierMatMul`` node.  Returns the new nodes.
    """
    if linear_weight(matmul) is None or matmul.op_type != "MatMul":
        raise ValueError(f"{matmul.name} is not a MatMul with a constant weight")
    x, old_w, y = matmul.inputs[0], matmul.inputs[1], matmul.outputs[0]
    base = base or (matmul.name or "linear").replace("/", "_").strip("_")
    idx = np.asarray(outlier_idx, np.int64).reshape(-1)
    k = w_q.shape[0]
    w_q = np.asarray(w_q, np.int8).copy()
    w_q[idx] = 0
    if custom_op:
        node = make_qc_gemm(graph, x, w_q, w_scale, base, outlier_idx=idx, w_outlier=w_outlier)
        node.meta.update(matmul.meta)
        node.metadata_props.update(matmul.metadata_props)
        graph.insert_before(matmul, node)
        _out_like(node, y)
        graph.remove(matmul, safe=True)
        nodes = [node]
    else:
        ft = float_type(old_w, x, y, default=graph_float_type(graph))  # the graph's float type
        mask, gather, side = outlier_side(graph, x, y, idx, k, w_outlier, base, ft)
        graph.insert_before(matmul, [mask, gather, side])
        matmul.replace_input_with(0, mask.outputs[0])
        per_token = emit_per_token_activation(graph, matmul, base)
        dq = emit_int8_weight(graph, matmul, w_q, w_scale, base)
        add = ir.node("Add", [y, side.outputs[0]], name=f"{base}_outlier_Add")
        add.metadata_props[QUANT_KEY] = OUTLIER_SPLIT
        graph.insert_after(matmul, add)
        y_name, y.name = y.name, f"{base}_int8_out"
        for use in list(y.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, add.outputs[0])
        if y.is_graph_output():
            graph.outputs[graph.outputs.index(y)] = add.outputs[0]
        add.outputs[0].name = y_name
        add.outputs[0].shape, add.outputs[0].type = y.shape, y.type
        nodes = [mask, gather, side, *per_token, dq, matmul, add]
    if old_w is not None and not old_w.uses() and old_w.name in graph.initializers:
        del graph.initializers[old_w.name]
    return nodes


def outlier_side(graph: ir.Graph, x: ir.Value, y: ir.Value, idx: np.ndarray, k: int, w_outlier: np.ndarray, base: str,
                 ft: ir.DataType) -> tuple[ir.Node, ir.Node, ir.Node]:
    """The nodes (not inserted) both forms of an outlier split share, for ``Y = X·W`` with ``K = k`` input channels:
    ``X ⊙ keep`` (the outlier channels ``idx`` zeroed, ``{base}_keep_Mul``), ``Gather(X, idx)`` and its product
    with ``w_outlier = W[idx]`` in float (``{base}_outlier_MatMul``, kept float by design), each output typed and
    shaped as made when ``X``'s shape is known (the fusions after need no shape inference)."""
    keep = np.ones(k, np.float32)
    keep[idx] = 0
    mask = ir.node("Mul", [x, add_initializer(graph, f"{base}_keep", float_array(keep, ft))], name=f"{base}_keep_Mul")
    gather = gather_channels(graph, x, idx, f"{base}_outlier_Gather", f"{base}_outlier_idx")
    side = ir.node("MatMul", [gather.outputs[0], add_initializer(graph, f"{base}_w_outlier", float_array(w_outlier, ft))],
                   name=f"{base}_outlier_MatMul")
    mark_kept_float(side, OUTLIER_SIDE)  # the coverage contract: float by design, not unsupported
    if x.shape is not None and len(x.shape):
        mask.outputs[0].shape, mask.outputs[0].type = x.shape, x.type
        side.outputs[0].shape, side.outputs[0].type = y.shape, y.type
    return mask, gather, side


@dataclass(frozen=True)
class OutlierSplitMatch:
    """A recognized portable outlier-split GEMM (see the module docstring)."""

    add: ir.Node
    x: ir.Value
    int8: W8A8Match
    outlier_idx: np.ndarray  # int64 [R]
    w_outlier: np.ndarray  # float32 [R, N]
    nodes: tuple[ir.Node, ...]


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def match_outlier_split(add: ir.Node) -> OutlierSplitMatch | None:
    """Recognize the portable outlier-split form ending in ``add``; None otherwise."""
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        mm, side = _producer(add.inputs[i], "MatMul"), _producer(add.inputs[1 - i], "MatMul")
        if mm is None or side is None:
            continue
        m = match_w8a8(mm)
        if m is None or m.kind != "per-token":
            continue
        mask = _producer(m.x, "Mul")
        gather = _producer(side.inputs[0], "Gather")
        if mask is None or gather is None or gather.attributes.get_int("axis", 0) not in (-1,):
            continue
        x = gather.inputs[0]
        keep = const_array(mask.inputs[1])
        idx = const_array(gather.inputs[1])
        w_o = const_array(side.inputs[1])
        if mask.inputs[0] is not x or keep is None or idx is None or w_o is None:
            continue
        k = m.w_q.shape[0]
        idx = idx.astype(np.int64).reshape(-1)
        expect = np.ones(k, np.float32)
        expect[idx] = 0
        if keep.shape != (k,) or not np.array_equal(keep.astype(np.float32), expect):
            continue
        if w_o.ndim != 2 or w_o.shape != (idx.size, m.w_q.shape[1]):
            continue
        if any(len(v.uses()) != 1 for v in (gather.outputs[0], side.outputs[0], mm.outputs[0])):
            continue
        if any(u.node not in m.nodes for u in mask.outputs[0].uses()):  # read by the per-token subgraph only
            continue
        return OutlierSplitMatch(add, x, m, idx, w_o.astype(np.float32), (mask, gather, side, *m.nodes, add))
    return None
