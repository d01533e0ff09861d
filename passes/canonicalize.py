"""canonicalize: find every decoder layer's linears from the graph's structure.

A *linear* is ``Y = X·W`` with ``W`` a constant 2-D weight (``MatMul``; a ``Gemm`` with a
constant weight is first rewritten ``Gemm(A, B, C; α, β, transB) = A·(α·op(B)) + β·C`` into
``MatMul`` + ``Add``, ``op(B) = Bᵀ`` as a new initializer, or as a ``Transpose`` view when
``B`` is shared, e.g. a tied embedding).  Each linear's role follows from data flow by the
rules of :mod:`qcompiler.families.rules` (names are never parsed):

* q / k / v reach exactly that input of attention ``softmax(q·kᵀ/√d + mask)·v``; a fused
  qkv_proj reaches all three through ``Split``/``Slice``/``Gather``;
* o_proj reads the probabilities·V product;
* down_proj reads an elementwise function, through an activation, of earlier linears:
  ``act(gate) ⊙ up`` (gated; SiLU, GELU erf/tanh, ...), ``act(part₀) ⊙ part₁`` of one
  gate_up_proj, or ``act(up)`` (a plain two-layer MLP);
* lm_head's output reaches a graph output without another matrix product.

Parallel blocks (attention and MLP reading one norm: cohere, falcon, phi) need nothing
special: rules look at each linear, not at the group sharing its input.

Layer index = number of attention entries (q_proj or qkv_proj) before the linear in
topological order, minus 1.  Each linear gets ``LinearInfo(layer, role)`` in
``node.meta``; the norm feeding a group (``match_rmsnorm``) is recorded on the summary.
Unrecognized linears are reported and left alone (the coverage contract of
``qc quantize`` refuses them unless ``--allow-partial``).  The pass changes no numerics.
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import RMSNormMatch, match_rmsnorm

from qcompiler.families.rules import ROLE_RULES, RuleContext
from qcompiler.irutil import add_initializer, is_linear, is_weight, topo_index
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.spec import LINEAR_KEY, LinearInfo, Role, set_linear_info

log = logging.getLogger(__name__)

CANONICAL_KEY = "qc.canonical"


@dataclass
class CanonicalSummary:
    """What canonicalize found (``model.graph.meta["qc.canonical"]``)."""

    num_layers: int = 0
    linears: dict[str, ir.Node] = field(default_factory=dict)  # "layers.3.q_proj" → node
    norms: dict[str, RMSNormMatch] = field(default_factory=dict)  # "layers.3.q_proj" → norm feeding it
    unclassified: list[str] = field(default_factory=list)
    nodes: tuple[weakref.ref, ...] = ()  # the node list it was found on: unchanged, no second run is needed

    def nodes_by_role(self, role: Role) -> list[ir.Node]:
        return [n for k, n in self.linears.items() if n.meta[LINEAR_KEY].role == role]

    def to_dict(self) -> dict[str, object]:
        roles: dict[str, int] = defaultdict(int)
        for n in self.linears.values():
            roles[n.meta[LINEAR_KEY].role.value] += 1
        return {"num_layers": self.num_layers, "roles": dict(roles), "unclassified": list(self.unclassified)}


def gemm_to_matmul(graph: ir.Graph) -> int:
    """Rewrite every ``Gemm`` with a constant weight as ``MatMul`` (+ ``Add`` bias); see module docstring."""
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain != "" or node.attributes.get_int("transA", 0):
            continue
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if a is None or not is_weight(b):
            continue
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        trans = node.attributes.get_int("transB", 0) == 1
        new: list[ir.Node] = []
        if trans and alpha == 1.0 and len(b.uses()) > 1:  # shared (tied): a view, not a copy
            t = ir.node("Transpose", [b], {"perm": [1, 0]}, name=f"{node.name}_Transpose")
            new.append(t)
            w = t.outputs[0]
        elif trans or alpha != 1.0:
            arr = b.const_value.numpy()  # type: ignore[union-attr]
            arr = np.ascontiguousarray((arr.T if trans else arr) * np.asarray(alpha, arr.dtype))
            w = add_initializer(graph, f"{b.name}_t" if trans else f"{b.name}_scaled", arr)
        else:
            w = b
        mm = ir.node("MatMul", [a, w], name=f"{node.name}_MatMul" if node.name else None)
        new.append(mm)
        out = mm.outputs[0]
        if c is not None:
            if beta != 1.0:
                cv = c.const_value.numpy() if c.const_value is not None else None  # type: ignore[union-attr]
                if cv is None:
                    continue
                c = add_initializer(graph, f"{c.name}_scaled", cv * np.asarray(beta, cv.dtype))
            add = ir.node("Add", [out, c], name=f"{node.name}_bias_Add" if node.name else None)
            new.append(add)
            out = add.outputs[0]
        y = node.outputs[0]
        out.shape, out.type = y.shape, y.type
        mm.metadata_props.update(node.metadata_props)
        graph.insert_before(node, new)
        y.replace_all_uses_with(out, replace_graph_outputs=True)
        name, y.name = y.name, None
        out.name = name
        graph.remove(node, safe=True)
        if b.name in graph.initializers and not b.uses() and b not in graph.outputs:
            del graph.initializers[b.name]
        count += 1
    return count


@register_pass
class Canonicalize(QCPass):
    """Annotate each linear with (decoder layer, role); see the module docstring."""

    name = "canonicalize"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        done = graph.meta.get(CANONICAL_KEY)
        if isinstance(done, CanonicalSummary) and _same_nodes(done.nodes, graph):
            log.info("canonicalize: already canonical (no node added or removed since)")
            return ir.passes.PassResult(model, modified=False)
        before = {id(n): _annotation(n) for n in graph if n.op_type in ("MatMul", "Gemm")}
        rewritten = gemm_to_matmul(graph)
        if rewritten:
            log.info("canonicalize: %d Gemm linear(s) rewritten as MatMul + Add", rewritten)
        order = topo_index(graph)
        linears = [n for n in graph if is_linear(n)]
        ctx = RuleContext(roles={}, graph_outputs={id(v) for v in graph.outputs})
        mlp_of: dict[int, int] = {}  # linear → its MLP (the down_proj's topo position)
        for n in linears:
            for rule in ROLE_RULES:
                if id(n) in ctx.roles:
                    break
                found = rule.apply(n, ctx)
                if found:
                    for k, role in found.items():
                        ctx.roles.setdefault(k, role)
                        if rule.name == "mlp":
                            mlp_of[k] = order[id(n)]
        roles = ctx.roles
        attn_starts = sorted(order[id(n)] for n in linears if roles.get(id(n)) in (Role.Q, Role.QKV))
        summary = CanonicalSummary()
        # several MLPs in one decoder layer: mixture-of-experts, numbered in graph order
        per_layer: dict[int, list[int]] = defaultdict(list)
        for pos in sorted(set(mlp_of.values())):
            per_layer[bisect.bisect_right(attn_starts, pos) - 1].append(pos)
        experts = {pos: i for mlps in per_layer.values() if len(mlps) > 1 for i, pos in enumerate(mlps)}

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
                info = LinearInfo(layer, role, experts.get(mlp_of.get(id(n), -1)))
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
        summary.nodes = tuple(weakref.ref(n) for n in graph)
        graph.meta[CANONICAL_KEY] = summary
        annotated = sum(before.get(id(n)) != _annotation(n) for n in linears)
        by_role = summary.to_dict()["roles"]
        log.info("canonicalize: %d decoder layers, linears by role %s", summary.num_layers, by_role)
        if summary.unclassified:
            log.warning("canonicalize: %d linear(s) not recognized, left alone: %s",
                        len(summary.unclassified), ", ".join(summary.unclassified[:8]))
        return ir.passes.PassResult(model, modified=bool(rewritten or annotated))

    def ensures(self, model: ir.Model) -> None:
        if not isinstance(model.graph.meta.get(CANONICAL_KEY), CanonicalSummary):
            raise ir.passes.PostconditionError(f"pass '{self.name}' left no canonical summary on the graph")


def _annotation(node: ir.Node) -> tuple[str | None, ...]:
    """A linear's serialized annotation (``qc.layer``/``qc.role``/``qc.expert`` metadata)."""
    return tuple(node.metadata_props.get(k) for k in ("qc.layer", "qc.role", "qc.expert"))


def _same_nodes(nodes: tuple[weakref.ref, ...], graph: ir.Graph) -> bool:
    """The graph holds exactly these node objects, in this order (no node added, removed or reordered;
    weak references, so a node made after another was freed cannot pass for it by a reused id)."""
    return len(nodes) == len(graph) and all(r() is n for r, n in zip(nodes, graph))


def canonical_summary(model: ir.Model) -> CanonicalSummary:
    """The summary of the last canonicalize run (running it if needed)."""
    summary = model.graph.meta.get(CANONICAL_KEY)
    if summary is None:
        Canonicalize()(model)
        summary = model.graph.meta[CANONICAL_KEY]
    return summary
