"""Role rules: how a linear's role follows from the graph's data flow, family-independently.

Each rule is one row of :data:`ROLE_RULES`: a name, the structural fact it checks (its
docstring), and a function ``(linear, context) → {node id: Role}`` that may also name
the linears it proves the roles of (the down rule names gate and up).  Canonicalize
runs the rules in order over every linear; the first that claims a linear wins.
Adding a layout means adding a row here (and a :class:`~qcompiler.families.Family`
entry), never a branch in a matcher.

Facts the rules read (all by value, never by name):

* ``reach(L)`` — the attention inputs (q, k, v) that ``L``'s output reaches
  (:func:`qcompiler.models.llama.forward_hits`, through Reshape/Transpose/RoPE/norms and
  any fan-out ``Split``/``Slice``/``Gather``);
* ``sources(v)`` — the values ``v`` is an *elementwise* function of
  (:data:`ELEMENTWISE`, constants ignored), each with whether an activation
  (:data:`NONLINEAR`) lies on its path: ``gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))``
  has one source ``x`` through ``Tanh``; ``silu(g)·u`` has sources ``g`` (through
  ``Sigmoid``) and ``u`` (none);
* ``linear_of(v)`` — the linear whose output ``v`` is, behind Reshape/Cast/bias-Add
  and, for a fused linear, one part of a ``Split``/``Slice``/``Gather`` fan-out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from qcompiler.irutil import ROTATION_MARK, is_linear
from qcompiler.models.llama import (
    ACTIVATIONS,
    FUSED_ATTENTION,
    comes_from,
    forward_hits,
    is_pv_matmul,
    is_score_matmul,
)
from qcompiler.spec import Role

#: Ops through which an MLP's activation and gating are traced (constants aside).
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Exp", "Sqrt", "Cast", "Identity", "Clip", "Min", "Max",
    *ACTIVATIONS,
})
#: The activations that make a product a gated MLP (gate side) or a plain MLP's hidden.
NONLINEAR = ACTIVATIONS
#: Shape-only steps between a linear's output and its consumer.
PASSTHROUGH = frozenset({"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
#: Fan-out ops that cut a fused linear's output into parts (q/k/v or gate/up).
FANOUT = frozenset({"Split", "Slice", "Gather", "Chunk"})


def _is_const(v: ir.Value | None) -> bool:
    """A constant, also behind ``Identity`` (exporters deduplicate equal initializers that way)."""
    for _ in range(4):
        if v is None or v.const_value is not None:
            return True
        p = v.producer()
        if p is None:
            return False
        if p.op_type == "Constant":
            return True
        if p.op_type not in ("Identity", "Cast"):
            return False
        v = p.inputs[0]
    return False


def sources(value: ir.Value, limit: int = 64) -> dict[int, tuple[ir.Value, bool]]:
    """Values ``value`` is an elementwise function of: ``{id: (value, activation on its path)}``."""
    out: dict[int, tuple[ir.Value, bool]] = {}
    stack: list[tuple[ir.Value, bool]] = [(value, False)]
    seen: set[tuple[int, bool]] = set()
    while stack and len(seen) < limit:
        v, act = stack.pop()
        if (id(v), act) in seen:
            continue
        seen.add((id(v), act))
        node = v.producer()
        if node is None or node.op_type not in ELEMENTWISE or node.domain not in ("", "com.microsoft"):
            prev = out.get(id(v))
            out[id(v)] = (v, act or (prev[1] if prev else False))
            continue
        act_here = act or node.op_type in NONLINEAR
        for i in node.inputs:
            if not _is_const(i):
                stack.append((i, act_here))  # type: ignore[arg-type]
    return out


def skip_passthrough(value: ir.Value) -> ir.Value:
    node = value.producer()
    while node is not None and node.op_type in PASSTHROUGH:
        value = node.inputs[0]  # type: ignore[assignment]
        node = value.producer()
    return value


def _skip_bias(value: ir.Value) -> ir.Value:
    """Step over ``Add(v, const)`` (a linear's bias) and passthrough ops."""
    value = skip_passthrough(value)
    node = value.producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        a, b = node.inputs
        if _is_const(b) and a is not None:
            return skip_passthrough(a)
        if _is_const(a) and b is not None:
            return skip_passthrough(b)
    return value


def linear_of(value: ir.Value) -> tuple[ir.Node, int | None] | None:
    """``(linear, part)``: ``value`` is the linear's output (part None) or one fan-out part of it."""
    value = _skip_bias(value)
    node = value.producer()
    if node is None:
        return None
    if is_linear(node):
        return node, None
    if node.op_type in FANOUT and node.inputs[0] is not None:
        src = _skip_bias(node.inputs[0]).producer()
        if src is not None and is_linear(src):
            return src, id(node) * 8 + next(i for i, o in enumerate(node.outputs) if o is value)
    return None


@dataclass
class RuleContext:
    """What the rules share: roles claimed so far and each linear's attention reach."""

    roles: dict[int, Role]
    graph_outputs: set[int]

    def free(self, node: ir.Node) -> bool:
        return id(node) not in self.roles


def attention_reach(linear: ir.Node) -> set[str]:
    """Which of attention's q, k, v inputs the linear's output reaches (see module docstring)."""
    found: set[str] = set()
    for node, slot in forward_hits(linear.outputs[0]):
        if node.op_type in FUSED_ATTENTION:
            found.add(FUSED_ATTENTION[node.op_type].get(slot, ""))
        elif node.op_type == "MatMul" and is_score_matmul(node):
            found.add("q" if slot == 0 else "k")
        elif node.op_type == "MatMul" and slot == 1 and is_pv_matmul(node):
            found.add("v")
    found.discard("")
    return found


def rule_attention_inputs(linear: ir.Node, ctx: RuleContext) -> dict[int, Role] | None:
    """q / k / v: the output reaches exactly that attention input; qkv_proj: it reaches all three
    (a fused linear cut by Split/Slice/Gather, including per-head interleaved layouts)."""
    reach = attention_reach(linear)
    if reach == {"q", "k", "v"}:
        return {id(linear): Role.QKV}
    if len(reach) == 1:
        return {id(linear): {"q": Role.Q, "k": Role.K, "v": Role.V}[reach.pop()]}
    return None


def rule_attention_output(linear: ir.Node, ctx: RuleContext) -> dict[int, Role] | None:
    """o_proj: the input comes (through Transpose/Reshape) from probs·V or a fused attention op."""
    src = comes_from(linear.inputs[0], frozenset(FUSED_ATTENTION) | {"MatMul"}, max_depth=6)
    if src is not None and not is_linear(src) and (src.op_type in FUSED_ATTENTION or is_pv_matmul(src)):
        return {id(linear): Role.O}
    return None


def rule_router(linear: ir.Node, ctx: RuleContext) -> dict[int, Role] | None:
    """router: a mixture-of-experts gate — the output reaches ``TopK`` (through Softmax/Cast) before
    any other linear: token → expert scores."""
    frontier = [linear]
    for _ in range(4):
        frontier = [u for n in frontier for o in n.outputs for u in o.consumers()
                    if u.op_type in ("Softmax", "Cast", "Sigmoid", "TopK", "Identity")]
        if any(u.op_type == "TopK" for u in frontier):
            return {id(linear): Role.ROUTER}
    return None


def rule_mlp(linear: ir.Node, ctx: RuleContext) -> dict[int, Role] | None:
    """down_proj: the input is an elementwise function, through an activation, of earlier linears:

    * ``act(x·W_g) ⊙ (x·W_u)`` — two linears, the one behind the activation is gate (SiLU, GELU erf
      or tanh, ReLU, ... gated MLPs);
    * ``act(part₀) ⊙ part₁`` of one linear cut in two — gate_up_proj (phi3);
    * ``act(x·W₁)`` — a plain two-layer MLP: ``W₁`` is up_proj (opt fc1, gpt2 c_fc, falcon h_to_4h).
    """
    x = linear.inputs[0]
    rot = x.producer() if x is not None else None
    if rot is not None and ROTATION_MARK in rot.metadata_props:  # passes/rotate.py's online transform
        x = rot.inputs[0]
    found = sources(skip_passthrough(x))  # type: ignore[arg-type]
    if not any(act for _, act in found.values()):
        return None
    by_linear: dict[int, tuple[ir.Node, set[int | None], bool]] = {}
    for v, act in found.values():
        lp = linear_of(v)
        if lp is None or lp[0] is linear or not ctx.free(lp[0]):
            return None
        node, part = lp
        _, parts, acts = by_linear.get(id(node), (node, set(), False))
        by_linear[id(node)] = (node, parts | {part}, acts or act)
    if len(by_linear) == 1:
        (node, parts, _), = by_linear.values()
        if parts == {None}:
            return {id(node): Role.UP, id(linear): Role.DOWN}
        if None not in parts and len(parts) == 2:
            return {id(node): Role.GATE_UP, id(linear): Role.DOWN}
        return None
    if len(by_linear) == 2:
        (a, pa, acta), (b, pb, actb) = by_linear.values()
        if pa != {None} or pb != {None} or acta == actb:
            return None
        gate, up = (a, b) if acta else (b, a)
        return {id(gate): Role.GATE, id(up): Role.UP, id(linear): Role.DOWN}
    return None


def rule_lm_head(linear: ir.Node, ctx: RuleContext) -> dict[int, Role] | None:
    """lm_head: the output reaches a graph output through a chain of single-consumer ops without
    another matrix product (logit scaling, soft-capping ``c·tanh(z/c)``, Cast, custom ops)."""
    return {id(linear): Role.LM_HEAD} if reaches_output(linear, ctx.graph_outputs) else None


def reaches_output(linear: ir.Node, graph_outputs: set[int], depth: int = 8) -> bool:
    """The linear's output reaches a graph output through single-consumer steps and no other matrix
    product (logit scaling, soft-capping, Cast, custom ops): an lm_head."""
    v = linear.outputs[0]
    for _ in range(depth):
        if id(v) in graph_outputs:
            return True
        users = list(v.consumers())
        if len(users) != 1 or users[0].op_type in ("MatMul", "Gemm") or not users[0].outputs:
            return False
        v = users[0].outputs[0]
    return id(v) in graph_outputs


@dataclass(frozen=True)
class RoleRule:
    name: str
    apply: Callable[[ir.Node, RuleContext], dict[int, Role] | None]


#: The rules, in the order they are tried (attention first: a fused linear that reaches q, k
#: and v must not be read as an MLP).
ROLE_RULES: tuple[RoleRule, ...] = (
    RoleRule("attention-inputs", rule_attention_inputs),
    RoleRule("attention-output", rule_attention_output),
    RoleRule("router", rule_router),
    RoleRule("mlp", rule_mlp),
    RoleRule("lm-head", rule_lm_head),
)
