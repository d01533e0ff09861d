"""canonicalize: find every decoder layer's linears from the graph's structure.

A *linear* is ``Y = X·W`` with ``W`` a constant 2-D weight (``MatMul``/``Gemm``).
Linears that read the same activation form a group; the roles follow from data flow
(names are never parsed):

* a group whose members reach attention — ``softmax(q·kᵀ/√d + mask)·v`` — is
  q/k/v: q arrives at input 0 of the score MatMul, k at its input 1, v at input 1
  of the MatMul whose input 0 comes from the Softmax (or slots 0/1/2 of a fused
  attention op);
* a linear whose input comes from the probabilities·V product is o;
* a group of two whose outputs meet in a product ``act(x·W_gate) ⊙ (x·W_up)`` is
  gate/up (gate is the one behind the activation), and the linear reading that
  product is down;
* a linear whose output is a graph output is lm_head;
* packed forms (``fuse-pack-linears``): one linear + ``Split`` whose parts reach attention's
  q, k and v is qkv_proj; one linear + ``Split`` into two parts meeting in
  ``act(part₀) ⊙ part₁`` is gate_up_proj.

Layer index = number of q/k/v groups before the linear in topological order, minus 1.
Each linear gets ``LinearInfo(layer, role)`` in ``node.meta``; the norm feeding a group
(``match_rmsnorm``) is recorded on the summary.  Unrecognized linears are reported and
left alone.  The pass changes no numerics.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import onnx_ir as ir
from qcompiler.models.llama import (
    ACTIVATIONS,
    FUSED_ATTENTION,
    RMSNormMatch,
    comes_from,
    forward_hits,
    is_pv_matmul,
    is_score_matmul,
    match_rmsnorm,
)

from qcompiler.irutil import is_linear, topo_index
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.spec import LINEAR_KEY, LinearInfo, Role, set_linear_info

log = logging.getLogger(__name__)


@dataclass
class CanonicalSummary:
    """What canonicalize found (``model.graph.meta["qc.canonical"]``)."""

    num_layers: int = 0
    linears: dict[str, ir.Node] = field(default_factory=dict)  # "layers.3.q_proj" → node
    norms: dict[str, RMSNormMatch] = field(default_factory=dict)  # "layers.3.q_proj" → norm feeding it
    unclassified: list[str] = field(default_factory=list)

    def nodes_by_role(self, role: Role) -> list[ir.Node]:
        return [n for k, n in self.linears.items() if n.meta[LINEAR_KEY].role == role]

    def to_dict(self) -> dict[str, object]:
        roles: dict[str, int] = defaultdict(int)
        for n in self.linears.values():
            roles[n.meta[LINEAR_KEY].role.value] += 1
        return {"num_layers": self.num_layers, "roles": dict(roles), "unclassified": list(self.unclassified)}


def _attention_role(linear: ir.Node) -> str | None:
    for node, slot in forward_hits(linear.outputs[0]):
        if node.op_type in FUSED_ATTENTION:
            return FUSED_ATTENTION[node.op_type].get(slot)
        if node.op_type == "MatMul":
            if slot == 0 and is_score_matmul(node):
                return "q"
            if slot == 1 and is_score_matmul(node):
                return "k"
            if slot == 1 and is_pv_matmul(node):
                return "v"
    return None


def _attention_roles(linear: ir.Node) -> set[str]:
    """Every attention input slot a (packed) linear's output reaches."""
    found: set[str] = set()
    for node, slot in forward_hits(linear.outputs[0]):
        if node.op_type in FUSED_ATTENTION:
            found.add(FUSED_ATTENTION[node.op_type].get(slot, ""))
        elif node.op_type == "MatMul" and is_score_matmul(node):
            found.add("q" if slot == 0 else "k")
        elif node.op_type == "MatMul" and slot == 1 and is_pv_matmul(node):
            found.add("v")
    return found


def _packed_mlp_product(linear: ir.Node) -> ir.Node | None:
    """For a packed gate/up linear (``Split`` into 2), the product ``act(gate) ⊙ up``."""
    splits = [u for u in _split_users(linear) if len(u.outputs) == 2]
    if len(splits) != 1:
        return None
    gate, up = splits[0].outputs
    frontier, seen_act = [gate], False
    for _ in range(3):
        nxt = []
        for v in frontier:
            for user in v.consumers():
                if user.op_type == "Mul" and seen_act and any(i is up for i in user.inputs):
                    return user
                if user.op_type in ACTIVATIONS or user.op_type == "Mul":
                    seen_act = seen_act or user.op_type in ACTIVATIONS
                    nxt.extend(user.outputs)
        frontier = nxt
    return None


def _mlp_roles(group: list[ir.Node]) -> tuple[dict[int, Role], ir.Node] | None:
    """For two linears whose outputs meet in a product, return ({id: GATE/UP}, product node)."""
    if len(group) != 2:
        return None
    a, b = group

    def reaches_product(src: ir.Node, other: ir.Node) -> tuple[ir.Node, bool] | None:
        # follow src's output through at most one activation block (x·σ(x), gelu, ...)
        seen_act = False
        frontier = [src.outputs[0]]
        for _ in range(4):
            nxt = []
            for v in frontier:
                for user in v.consumers():
                    if user.op_type == "Mul" and any(
                        inp is not None and inp.producer() is not None and _derives(inp, other.outputs[0])
                        for inp in user.inputs
                        if inp is not v
                    ):
                        return user, seen_act
                    if user.op_type in ACTIVATIONS or user.op_type == "Mul":
                        seen_act = seen_act or user.op_type in ACTIVATIONS
                        nxt.extend(user.outputs)
            frontier = nxt
        return None

    ra, rb = reaches_product(a, b), reaches_product(b, a)
    if ra is None or rb is None or ra[0] is not rb[0]:
        return None
    if ra[1] and not rb[1]:
        return {id(a): Role.GATE, id(b): Role.UP}, ra[0]
    if rb[1] and not ra[1]:
        return {id(b): Role.GATE, id(a): Role.UP}, ra[0]
    return None


def _derives(value: ir.Value, source: ir.Value, depth: int = 4) -> bool:
    if value is source:
        return True
    node = value.producer()
    if node is None or depth == 0:
        return False
    return any(i is not None and _derives(i, source, depth - 1) for i in node.inputs)


def _is_lm_head(node: ir.Node, graph_outputs: set[int]) -> bool:
    v = node.outputs[0]
    for _ in range(3):
        if id(v) in graph_outputs:
            return True
        users = list(v.consumers())
        if len(users) != 1 or users[0].op_type not in ("Cast", "Identity", "Add", "Reshape"):
            return False
        v = users[0].outputs[0]
    return id(v) in graph_outputs


@register_pass
class Canonicalize(QCPass):
    """Annotate each linear with (decoder layer, role); see the module docstring."""

    name = "canonicalize"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        order = topo_index(graph)
        linears = [n for n in graph if is_linear(n)]
        groups: dict[int, list[ir.Node]] = defaultdict(list)
        for n in linears:
            groups[id(n.inputs[0])].append(n)

        roles: dict[int, Role] = {}
        attn_starts: list[int] = []  # topo position of each q/k/v group
        graph_outputs = {id(v) for v in graph.outputs}
        summary = CanonicalSummary()
        products: list[ir.Value] = []  # act(gate) ⊙ up of each MLP

        for members in groups.values():
            found = {id(n): _attention_role(n) for n in members}
            if any(found.values()):
                kinds = sorted(r for r in found.values() if r)
                if kinds == ["k", "q", "v"] and len(members) == 3:
                    for n in members:
                        roles[id(n)] = {"q": Role.Q, "k": Role.K, "v": Role.V}[found[id(n)]]
                    attn_starts.append(min(order[id(n)] for n in members))
                elif len(members) == 1 and _feeds_split(members[0]) and (
                    found[id(members[0])] == "q" or {"q", "k", "v"} <= _attention_roles(members[0])
                ):
                    roles[id(members[0])] = Role.QKV
                    attn_starts.append(order[id(members[0])])
                continue
            packed_product = _packed_mlp_product(members[0]) if len(members) == 1 else None
            if packed_product is not None:  # gate/up packed into one linear + Split (fuse-pack-linears)
                roles[id(members[0])] = Role.GATE_UP
                products.append(packed_product.outputs[0])
                continue
            mlp = _mlp_roles(members)
            if mlp:
                roles.update(mlp[0])
                products.append(mlp[1].outputs[0])

        product_ids = {id(v) for v in products}
        attention_ops = frozenset(FUSED_ATTENTION) | frozenset({"MatMul"})
        for n in linears:
            if id(n) in roles:
                continue
            if id(_skip_passthrough(n.inputs[0])) in product_ids:
                roles[id(n)] = Role.DOWN
                continue
            src = comes_from(n.inputs[0], attention_ops, max_depth=6)
            if src is not None and not is_linear(src) and (src.op_type in FUSED_ATTENTION or is_pv_matmul(src)):
                roles[id(n)] = Role.O
                continue
            if _is_lm_head(n, graph_outputs):
                roles[id(n)] = Role.LM_HEAD

        attn_starts.sort()

        for n in linears:
            role = roles.get(id(n))
            if role is None:
                summary.unclassified.append(n.name or "?")
                continue
            if role == Role.LM_HEAD:
                info = LinearInfo(-1, role)
            else:
                layer = bisect.bisect_right(attn_starts, order[id(n)]) - 1
                if layer < 0:
                    summary.unclassified.append(n.name or "?")
                    continue
                info = LinearInfo(layer, role)
            if info.key in summary.linears:
                log.warning("canonicalize: two linears claim %s; leaving %s unannotated", info.key, n.name)
                summary.unclassified.append(n.name or "?")
                continue
            set_linear_info(n, info)
            summary.linears[info.key] = n
            norm = match_rmsnorm(n.inputs[0])
            if norm is not None:
                summary.norms[info.key] = norm

        summary.num_layers = len(attn_starts)
        graph.meta["qc.canonical"] = summary
        by_role = summary.to_dict()["roles"]
        log.info("canonicalize: %d decoder layers, linears by role %s", summary.num_layers, by_role)
        if summary.unclassified:
            log.warning("canonicalize: %d linear(s) not recognized, left alone: %s",
                        len(summary.unclassified), ", ".join(summary.unclassified[:8]))
        return ir.passes.PassResult(model, modified=False)


def _skip_passthrough(value: ir.Value) -> ir.Value:
    node = value.producer()
    while node is not None and node.op_type in ("Cast", "Identity", "Reshape"):
        value = node.inputs[0]
        node = value.producer()
    return value


def _split_users(node: ir.Node) -> list[ir.Node]:
    """``Split`` nodes reading the linear's output, directly or after a constant bias ``Add``."""
    out = node.outputs[0]
    users = list(out.consumers())
    if len(users) == 1 and users[0].op_type == "Add" and any(
        i is not None and i is not out and i.const_value is not None for i in users[0].inputs
    ):
        users = list(users[0].outputs[0].consumers())
    return [u for u in users if u.op_type == "Split"]


def _feeds_split(node: ir.Node) -> bool:
    return bool(_split_users(node))


def canonical_summary(model: ir.Model) -> CanonicalSummary:
    """The summary of the last canonicalize run (running it if needed)."""
    summary = model.graph.meta.get("qc.canonical")
    if summary is None:
        Canonicalize()(model)
        summary = model.graph.meta["qc.canonical"]
    return summary
