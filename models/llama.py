"""Structural patterns of Llama-family decoders (Llama, Mistral, Qwen2, SmolLM, ...).

Everything here is found from the graph's *structure*, never from node names:

* **RMSNorm** ``y = γ ⊙ x / sqrt(mean(x²) + ε)`` as exported by torch
  (``Pow → ReduceMean → Add ε → Sqrt → Div(1, ·) → Mul(x, ·) → [Cast] → Mul γ``, with
  the ``Reciprocal`` / ``Div(x, ·)`` variants) or as a fused
  ``(Skip)SimplifiedLayerNormalization``.
* **Data-flow tracing**: from a linear's output, follow data edges (never the
  ``Shape``/``Size`` metadata edges) to the first *dynamic* MatMul or fused attention
  op, and note which input it arrives at.  In ``softmax(q·kᵀ)·v`` the query arrives at
  slot 0 of the score MatMul, the key at slot 1 of it, the value at slot 1 of the
  MatMul whose slot 0 comes from a Softmax.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from qcompiler.irutil import is_linear, scalar_const

#: Ops that carry shapes, not data: tracing never walks through them.
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range", "EyeLike"})
#: Fused attention ops and the input slot of q, k, v.
FUSED_ATTENTION = {
    "GroupQueryAttention": {0: "q", 1: "k", 2: "v"},
    "MultiHeadAttention": {0: "q", 1: "k", 2: "v"},
    "Attention": {0: "q", 1: "k", 2: "v"},  # opset-23 Attention
}
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
