"""Structural patterns of Llama-family decoders (Llama, Mistral, Qwen2, SmolLM, ...).

Everything here is found from the graph's *structure*, never from node names:

* **RMSNorm** ``y = γ ⊙ x / sqrt(mean(x²) + ε)`` as exported by torch
  (``Pow → ReduceMean → Add ε → Sqrt → Div(1, ·) → Mul(x, ·) → [Cast] → Mul γ``, with
  the ``Reciprocal`` / ``Div(x, ·)`` variants) or as a fused
  ``(Skip)SimplifiedLayerNormalization``.
* **Rotary position embedding** ``x·C + rotate_half(x)·S`` (:func:`match_rotary`).
* **Shape facts** (:func:`dims`, :func:`int_value`) from ONNX shape inference.
* **Data-flow tracing**: from a linear's output, follow data edges (never the
  ``Shape``/``Size`` metadata edges) to the first *dynamic* MatMul or fused attention
  op, and note which input it arrives at.  In ``softmax(q·kᵀ)·v`` the query arrives at
  slot 0 of the score MatMul, the key at slot 1 of it, the value at slot 1 of the
  MatMul whose slot 0 comes from a Softmax.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import const_array, is_linear, scalar_const

#: Ops that carry shapes, not data: tracing never walks through them.
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range", "EyeLike"})
#: Fused attention ops and the input slot of q, k, v.
FUSED_ATTENTION = {
    "GroupQueryAttention": {0: "q", 1: "k", 2: "v"},
    "MultiHeadAttention": {0: "q", 1: "k", 2: "v"},
    "Attention": {0: "q", 1: "k", 2: "v"},  # opset-23 Attention
}
Dim = int | str | None
ACTIVATIONS = frozenset(
    {"Sigmoid", "Tanh", "Relu", "Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Silu", "Softplus", "HardSigmoid"}
)


@dataclass(frozen=True)
class RMSNormMatch:
    """An RMSNorm whose output is ``output``.

    ``gamma`` is the scale initializer (None for a norm without weight), ``mul`` the
    node multiplying by it (the node a smoothing pass rescales), ``input`` the
    un-normalized input ``x``, ``eps`` the epsilon and ``fused`` whether it is one
    ``SimplifiedLayerNormalization``-like node.
    """

    output: ir.Value
    input: ir.Value
    gamma: ir.Value | None
    mul: ir.Node
    eps: float
    fused: bool


def _producer(value: ir.Value | None, op: str | tuple[str, ...]) -> ir.Node | None:
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    ops = (op,) if isinstance(op, str) else op
    return node if node.op_type in ops and node.domain in ("", "ai.onnx", "com.microsoft") else None


def _skip_cast(value: ir.Value | None) -> ir.Value | None:
    while value is not None:
        node = value.producer()
        if node is None or node.op_type not in ("Cast", "Identity"):
            return value
        value = node.inputs[0]
    return value


def _match_inv_rms(value: ir.Value | None, x: ir.Value) -> float | None:
    """``value == 1/sqrt(mean(x², -1) + eps)``: return eps."""
    value = _skip_cast(value)
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "Reciprocal":
        sqrt = _producer(node.inputs[0], "Sqrt")
    elif node.op_type == "Div" and scalar_const(node.inputs[0]) == 1.0:
        sqrt = _producer(node.inputs[1], "Sqrt")
    elif node.op_type == "Sqrt":  # rsqrt written as Sqrt(1/(...)) is rare; unsupported
        return None
    else:
        return None
    if sqrt is None:
        return None
    return _match_mean_square_plus_eps(sqrt.inputs[0], x)


def _match_mean_square_plus_eps(value: ir.Value | None, x: ir.Value) -> float | None:
    add = _producer(value, "Add")
    if add is None:
        return None
    for i in (0, 1):
        eps = scalar_const(add.inputs[1 - i])
        mean = _producer(add.inputs[i], "ReduceMean")
        if eps is None or mean is None:
            continue
        if mean.attributes.get_int("keepdims", 1) != 1:
            return None
        if not _reduces_last_axis(mean):
            return None
        sq = mean.inputs[0].producer() if mean.inputs[0] is not None else None
        if sq is None:
            return None
        if sq.op_type == "Pow" and scalar_const(sq.inputs[1]) == 2.0:
            src = sq.inputs[0]
        elif sq.op_type == "Mul" and sq.inputs[0] is sq.inputs[1]:
            src = sq.inputs[0]
        else:
            return None
        if _skip_cast(src) is not _skip_cast(x):
            return None
        return eps
    return None


def _reduces_last_axis(node: ir.Node) -> bool:
    axes = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        from qcompiler.irutil import const_array

        arr = const_array(node.inputs[1])
        if arr is None:
            return False
        axes = [int(a) for a in arr.reshape(-1)]
    elif "axes" in node.attributes:
        axes = list(node.attributes.get_ints("axes", []))
    if axes is None or len(axes) != 1:
        return False
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def match_rmsnorm(value: ir.Value | None) -> RMSNormMatch | None:
    """Match an RMSNorm producing ``value`` (see module docstring), else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization") and value is node.outputs[0]:
        x = node.inputs[0]
        gamma_index = 2 if node.op_type.startswith("Skip") else 1
        eps = node.attributes.get_float("epsilon", 1e-5)
        return RMSNormMatch(value, x, node.inputs[gamma_index], node, eps, True)
    if node.op_type != "Mul":
        return None
    # value = γ ⊙ normed   (γ constant, either side)
    for gi in (0, 1):
        gamma = node.inputs[gi]
        if gamma is None or gamma.const_value is None or len(gamma.shape or ()) != 1:
            continue
        normed = _skip_cast(node.inputs[1 - gi])
        inner = _producer(normed, "Mul")
        if inner is None:
            continue
        found = _match_normed(inner)
        if found is not None:
            x, eps = found
            return RMSNormMatch(value, x, gamma, node, eps, False)
    # weightless RMSNorm: value itself is x * inv_rms
    found = _match_normed(node)
    if found is not None:
        x, eps = found
        return RMSNormMatch(value, x, None, node, eps, False)
    return None


def _match_normed(mul: ir.Node) -> tuple[ir.Value, float] | None:
    """``mul == x * inv_rms(x)`` (either order) → (x, eps)."""
    for xi in (0, 1):
        x = mul.inputs[xi]
        if x is None:
            continue
        eps = _match_inv_rms(mul.inputs[1 - xi], x)
        if eps is not None:
            return x, eps
    return None


# ----------------------------------------------------------------------------- tracing


def forward_hits(start: ir.Value, stop_ops: frozenset[str] = frozenset()) -> list[tuple[ir.Node, int]]:
    """First dynamic MatMuls / fused attention ops reached from ``start`` along data edges.

    Returns ``(node, input_slot)`` pairs.  Linears (MatMul with a constant weight) are
    also stops (they are the next layer, not attention).
    """
    hits: list[tuple[ir.Node, int]] = []
    seen: set[int] = set()
    queue: deque[ir.Value] = deque([start])
    while queue:
        v = queue.popleft()
        for use in v.uses():
            node, slot = use.node, use.idx
            if id(node) in seen and node.op_type not in ("MatMul",) and node.op_type not in FUSED_ATTENTION:
                continue
            if node.op_type in SHAPE_OPS:
                continue
            if node.op_type == "MatMul" and node.domain == "":
                if is_linear(node) and slot == 0:
                    continue  # the next linear layer: not attention
                hits.append((node, slot))
                continue
            if node.op_type in FUSED_ATTENTION:
                hits.append((node, slot))
                continue
            if node.op_type in stop_ops:
                continue
            seen.add(id(node))
            queue.extend(o for o in node.outputs)
    return hits


def comes_from(value: ir.Value | None, op_types: frozenset[str], max_depth: int = 12) -> ir.Node | None:
    """The nearest producer of one of ``op_types`` upstream of ``value`` along input 0/1 data edges."""
    frontier = [value]
    for _ in range(max_depth):
        nxt: list[ir.Value | None] = []
        for v in frontier:
            if v is None or v.producer() is None:
                continue
            node = v.producer()
            if node.op_type in op_types:
                return node
            if node.op_type in SHAPE_OPS or (node.op_type == "MatMul" and node.domain == ""):
                continue
            nxt.extend(node.inputs[:2])
        frontier = nxt
        if not frontier:
            break
    return None


def is_score_matmul(node: ir.Node) -> bool:
    """A dynamic MatMul whose result reaches a Softmax before any other MatMul."""
    seen: set[int] = set()
    queue: deque[ir.Value] = deque(node.outputs)
    while queue:
        v = queue.popleft()
        for user in v.consumers():
            if id(user) in seen or user.op_type in SHAPE_OPS:
                continue
            seen.add(id(user))
            if user.op_type == "Softmax":
                return True
            if user.op_type == "MatMul":
                continue
            queue.extend(user.outputs)
    return False


def is_pv_matmul(node: ir.Node) -> bool:
    """A dynamic MatMul whose first input comes from a Softmax (attention probabilities × V)."""
    return comes_from(node.inputs[0], frozenset({"Softmax"}), max_depth=6) is not None


# ----------------------------------------------------------------------------- shape facts


def dims(value: ir.Value | None) -> list[Dim] | None:
    """The value's dims (int, symbolic name, or None when unknown), or None for an unknown rank."""
    if value is None or value.shape is None:
        return None
    out: list[Dim] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            name = getattr(d, "value", None)
            out.append(name if isinstance(name, str) and not name.startswith("unk__") else None)
    return out


def same_dim(a: Dim, b: Dim) -> bool:
    """Two dims known to be equal (equal ints, or the same symbolic name)."""
    return a is not None and b is not None and a == b



def int_value(value: ir.Value | None) -> list[int] | None:
    """Evaluate a small int64 shape expression (constants, Shape of known dims, arithmetic)."""
    if value is None:
        return None
    arr = const_array(value)
    if arr is not None:
        return [int(x) for x in np.asarray(arr).reshape(-1)] if arr.dtype.kind in "iu" else None
    node = value.producer()
    if node is None or node.domain != "":
        return None
    op = node.op_type
    if op == "Shape":
        d = dims(node.inputs[0])
        if d is None:
            return None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(d))
        part = d[start:end]
        return [int(x) for x in part] if all(isinstance(x, int) for x in part) else None
    if op == "Cast" and node.attributes.get_int("to", 0) not in (2, 3, 4, 5, 6, 7, 12, 13):
        return None  # only casts between integer types keep integer arithmetic
    if op in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        return int_value(node.inputs[0])
    if op == "Gather":
        idx = int_value(node.inputs[1])
        shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if idx is not None and shape_node is not None and shape_node.op_type == "Shape" and shape_node.domain == "":
            d = dims(shape_node.inputs[0])  # only the gathered dims need to be known
            start = shape_node.attributes.get_int("start", 0)
            if d is None or start != 0 or "end" in shape_node.attributes:
                return None
            try:
                picked = [d[i] for i in idx]
            except IndexError:
                return None
            return [int(x) for x in picked] if all(isinstance(x, int) for x in picked) else None
        data = int_value(node.inputs[0])
        if data is None or idx is None:
            return None
        try:
            return [data[i] for i in idx]
        except IndexError:
            return None
    if op == "Slice" and len(node.inputs) >= 3:
        shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
        bounds = [int_value(i) for i in node.inputs[1:]]
        if any(b is None or len(b) != 1 for b in bounds) or (len(bounds) > 2 and bounds[2] != [0]) \
                or (len(bounds) > 3 and bounds[3] != [1]):
            return None
        if shape_node is not None and shape_node.op_type == "Shape" and shape_node.domain == "" \
                and not shape_node.attributes:
            d = dims(shape_node.inputs[0])  # only the sliced dims need to be known
        else:
            d = int_value(node.inputs[0])  # type: ignore[assignment]
        if d is None:
            return None
        part = d[slice(bounds[0][0], bounds[1][0])]  # type: ignore[index]
        return [int(x) for x in part] if all(isinstance(x, int) for x in part) else None
    if op == "Concat":
        parts = [int_value(i) for i in node.inputs]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]  # type: ignore[union-attr]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = int_value(node.inputs[0]), int_value(node.inputs[1])
        if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        n = max(len(a), len(b))
        a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
        if op == "Div" and any(y == 0 for y in b):
            return None
        fn = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
              "Div": lambda x, y: int(np.trunc(x / y)) if (x < 0) != (y < 0) else x // y}[op]
        return [fn(x, y) for x, y in zip(a, b)]
    return None


# ----------------------------------------------------------------------------- rotary


#: Elementwise unary steps allowed between ``Concat(f, f)`` and a rotary table.
_TABLE_UNARY = frozenset({"Cos", "Sin", "Cast", "Identity", "Neg"})
_TABLE_SCALAR = frozenset({"Mul", "Div", "Add", "Sub"})
_BIG = 2**62


@dataclass(frozen=True)
class RotaryMatch:
    """``output = x·C + rotate_half(x)·S`` on ``x[B, N, S, H]``, ``rotate_half(x) = [−x₂, x₁]``.

    ``cos``/``sin`` are the ``[B, S, H]`` tables (``C = Unsqueeze(cos, 1)``), each an
    elementwise function of ``Concat(f, f)`` so that their two halves are equal;
    ``half = H/2``.  ``nodes`` are the per-tensor nodes (slices, Neg, Concat, Muls, Add).
    """

    output: ir.Value
    x: ir.Value
    cos: ir.Value
    sin: ir.Value
    half: int
    nodes: tuple[ir.Node, ...]


def _slice_parts(node: ir.Node, x: ir.Value) -> tuple[list[int], list[int]] | None:
    """(starts, ends) of a last-axis, unit-step ``Slice`` of ``x``."""
    if node.inputs[0] is not x or len(node.inputs) < 3:
        return None
    starts, ends = int_value(node.inputs[1]), int_value(node.inputs[2])
    axes = int_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = int_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    rank = len(dims(x) or [])
    if starts is None or ends is None or axes is None or steps != [1] or len(starts) != 1 or len(ends) != 1:
        return None
    if axes[0] not in (-1, rank - 1) or rank == 0:
        return None
    return starts, ends


def _rotate_half(rot: ir.Value, x: ir.Value) -> tuple[int, list[ir.Node]] | None:
    """``rot == Concat(−x[..., h:], x[..., :h])`` on the last axis: return (h, nodes)."""
    cat = _producer(rot, "Concat")
    rank = len(dims(x) or [])
    if cat is None or len(cat.inputs) != 2 or cat.attributes.get_int("axis", 0) not in (-1, rank - 1):
        return None
    neg = _producer(cat.inputs[0], "Neg")
    hi = _producer(neg.inputs[0], "Slice") if neg is not None else None
    lo = _producer(cat.inputs[1], "Slice")
    if hi is None or lo is None:
        return None
    p_hi, p_lo = _slice_parts(hi, x), _slice_parts(lo, x)
    h_dim = (dims(x) or [None])[-1]
    if p_hi is None or p_lo is None or not isinstance(h_dim, int) or h_dim % 2:
        return None
    (hs, he), (ls, le) = p_hi, p_lo
    half = h_dim // 2
    if ls != [0] or le != [half] or hs != [half] or not (he[0] >= h_dim or he[0] >= _BIG):
        return None
    return half, [cat, neg, hi, lo]


def _duplicated_table(value: ir.Value | None) -> bool:
    """``value`` is an elementwise function of ``Concat(f, f)`` on the last axis."""
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None or node.domain != "":
            return False
        if node.op_type == "Concat":
            a, b = node.inputs
            rank = len(dims(value) or [])
            return a is not None and a is b and node.attributes.get_int("axis", 0) in (-1, rank - 1) and rank > 0
        if node.op_type in _TABLE_UNARY:
            value = node.inputs[0]
        elif node.op_type in _TABLE_SCALAR and scalar_const(node.inputs[1]) is not None:
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Add") and scalar_const(node.inputs[0]) is not None:
            value = node.inputs[1]
        else:
            return False
    return False


def _head_table(value: ir.Value | None) -> ir.Value | None:
    """``value == Unsqueeze(T, [1])`` with ``T[B, S, H]`` a duplicated-halves table: return T."""
    node = _producer(value, "Unsqueeze")
    if node is None or node.domain == "com.microsoft":
        return None
    axes = int_value(node.inputs[1]) if len(node.inputs) > 1 else list(node.attributes.get_ints("axes", []))
    table = node.inputs[0]
    if axes != [1] or len(dims(table) or []) != 3 or not _duplicated_table(table):
        return None
    return table


def match_rotary(value: ir.Value | None) -> RotaryMatch | None:
    """Match rotary position embedding producing ``value`` on a ``[B, N, S, H]`` tensor, else None."""
    add = _producer(value, "Add")
    if add is None or add.domain == "com.microsoft" or len(dims(value) or []) != 4:
        return None
    for i in (0, 1):
        m_cos, m_sin = _producer(add.inputs[i], "Mul"), _producer(add.inputs[1 - i], "Mul")
        if m_cos is None or m_sin is None:
            continue
        for j in (0, 1):
            x, c4 = m_cos.inputs[j], m_cos.inputs[1 - j]
            for k in (0, 1):
                rot = _rotate_half(m_sin.inputs[k], x) if x is not None else None
                if rot is None:
                    continue
                cos, sin = _head_table(c4), _head_table(m_sin.inputs[1 - k])
                if cos is None or sin is None:
                    continue
                if (dims(cos) or [None])[-1] != 2 * rot[0] or (dims(sin) or [None])[-1] != 2 * rot[0]:
                    continue
                return RotaryMatch(value, x, cos, sin, rot[0], (add, m_cos, m_sin, *rot[1]))  # type: ignore[arg-type]
    return None
