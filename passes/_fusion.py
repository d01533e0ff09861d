"""Graph surgery shared by the ``fuse-*`` passes (not a pass: the leading ``_`` keeps it out of discovery).

A fusion replaces a *region* — the nodes between some leaf values and one output —
by a fused node computing the same function.  It is only safe when every value made
inside the region is used inside it (or is the output being replaced), so
:func:`region` collects the nodes and :func:`is_closed` checks that.  Shape and type
facts come from :func:`qcompiler.shapes.infer_shapes` (the shapes the export recorded, or
ONNX Runtime's symbolic inference); where a fact a fusion needs is unknown the fusion is
skipped, never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from qcompiler.models.llama import dims, int_value, same_dim

from qcompiler.irutil import add_initializer, ensure_opset, remove_unused_initializers, unique_name
from qcompiler.pipeline import QCPass
from qcompiler.shapes import infer_shapes, shapes_current

__all__ = ["dims", "infer_shapes", "int_value", "same_dim"]  # re-exported for the fuse-* passes

log = logging.getLogger(__name__)


def region(output: ir.Value, leaves: Iterable[ir.Value]) -> list[ir.Node] | None:
    """Nodes computing ``output`` from ``leaves`` and constants; None if it reads anything else."""
    leaf_ids = {id(v) for v in leaves}
    nodes: dict[int, ir.Node] = {}
    stack = [output]
    while stack:
        v = stack.pop()
        if v is None or id(v) in leaf_ids or v.const_value is not None:
            continue
        node = v.producer()
        if node is None:
            return None  # a graph input that is not a leaf
        if id(node) in nodes:
            continue
        if node.op_type == "Constant" and node.domain == "":
            continue
        nodes[id(node)] = node
        stack.extend(node.inputs)
    return list(nodes.values())


def is_closed(nodes: Sequence[ir.Node], outputs: Iterable[ir.Value], graph: ir.Graph) -> bool:
    """Every value made by ``nodes`` is used only by ``nodes`` (except ``outputs``)."""
    inside = {id(n) for n in nodes}
    allowed = {id(v) for v in outputs}
    graph_outputs = {id(v) for v in graph.outputs}
    for n in nodes:
        for o in n.outputs:
            if id(o) in allowed:
                continue
            if id(o) in graph_outputs:
                return False
            if any(id(u.node) not in inside for u in o.uses()):
                return False
    return True


def new_node(
    graph: ir.Graph,
    op: str,
    inputs: Sequence[ir.Value | None],
    name: str,
    attributes: dict[str, object] | None = None,
    domain: str = "",
    num_outputs: int = 1,
    output_names: Sequence[str | None] | None = None,
) -> ir.Node:
    """A new node with uniquely named outputs (``None`` in ``output_names`` = an omitted output)."""
    names = list(output_names) if output_names is not None else [f"{name}_out{i}" if num_outputs > 1 else f"{name}_out"
                                                                  for i in range(num_outputs)]
    outs = [ir.Value(name=unique_name(graph, n) if n else "") for n in names]
    return ir.node(op, list(inputs), attributes=attributes or {}, domain=domain, name=unique_name(graph, name),
                   outputs=outs)


def const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, name, np.asarray(array))


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` (graph outputs too, keeping their names) at ``new``."""
    is_output = old in graph.outputs
    if new.type is None and old.type is not None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output:
        name, shape, typ = old.name, old.shape, old.type
        old.name = None
        new.name = name
        new.shape, new.type = shape, typ
        used = graph.meta.get("qc.used_names")
        if isinstance(used, set) and name:
            used.add(name)


def _is_sorted(graph: ir.Graph) -> bool:
    """Every node's inputs are made by earlier nodes (or are graph inputs / initializers): one linear scan,
    where a topological sort of the whole graph after every fusion cost a tenth of a compile."""
    seen: set[int] = set()
    for node in graph:
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and p.graph is graph and id(p) not in seen:
                return False
        seen.add(id(node))
    return True


def cleanup(model: ir.Model) -> int:
    """Drop nodes and initializers nothing uses, and restore topological order; returns nodes removed."""
    graph = model.graph
    if not _is_sorted(graph):  # consumers after producers: one reverse sweep suffices
        common_passes.TopologicalSortPass()(model)
    outputs = {id(v) for v in graph.outputs}
    dead: dict[int, ir.Node] = {}
    for node in reversed(list(graph)):  # consumers first: a node is dead when only dead nodes read it
        if any(id(o) in outputs or any(id(u.node) not in dead for u in o.uses()) for o in node.outputs):
            continue
        dead[id(node)] = node
    if dead:  # one removal (each graph.remove call copies the graph's outputs into a set)
        graph.remove(list(dead.values()), safe=True)
    removed = len(dead)
    remove_unused_initializers(graph)
    shapes_current(model)  # the fusions give every value they replace the replaced one's shape
    return removed


@dataclass(frozen=True)
class RuleGroup:
    """The onnxscript rewrite rules (``RewriteRule``: pattern, check, replacement) of one fusion, tried
    at the nodes ``candidate`` accepts; ``name`` is its pass name (report key), ``shapes`` whether its
    checks read inferred shapes, ``domain`` the opset its replacement writes (``""``: the default)."""

    name: str
    rules: Sequence[object]
    candidate: Callable[[ir.Node], bool]
    what: str = "rewrite(s)"
    shapes: bool = True
    domain: str = ""


def sweep(model: ir.Model, groups: Sequence[RuleGroup]) -> dict[str, int]:
    """Apply ``groups`` in one walk over the graph; returns the rewrites per group.

    At each node, the groups whose cheap structural test (``candidate``) accepts it try their rules
    in order, first match wins; the nodes a rewrite makes are visited at once, so a rule rooted at a
    fused node (``SkipSimplifiedLayerNormalization`` at the ``SimplifiedLayerNormalization`` just made)
    fires in the same walk, where a pass per fusion walked the graph again.  What
    ``RewriteRuleSet.apply_to_model`` does for the main graph, minus trying every rule at every node
    (the matcher costs ~0.1 ms per try: over a 5000-node decoder, more than the fusion is worth).
    """
    import onnxscript.optimizer
    from onnx_ir import convenience

    if any(g.shapes for g in groups):
        infer_shapes(model)
    graph = model.graph
    counts = dict.fromkeys((g.name for g in groups), 0)

    def visit(node: ir.Node) -> None:
        for group in groups:
            if not group.candidate(node):
                continue
            for rule in group.rules:
                delta = rule.try_rewrite(model, graph, node)  # type: ignore[attr-defined]
                if delta is None:
                    continue
                for init in delta.new_initializers:
                    if init.name not in graph.initializers:
                        graph.register_initializer(init)
                onnxscript.optimizer.basic_constant_propagation(delta.new_nodes)
                convenience.replace_nodes_and_values(graph, node, delta.match.nodes if rule.remove_nodes else [],  # type: ignore[attr-defined]
                                                     delta.new_nodes, delta.match.outputs, delta.new_outputs)
                counts[group.name] += 1
                for made in delta.new_nodes:
                    visit(made)
                return

    for node in list(graph):
        if node.graph is graph:  # not removed by an earlier rewrite
            visit(node)
    for group in groups:
        if counts[group.name] and group.domain:
            ensure_opset(model, group.domain, 1)
    if any(counts.values()):
        cleanup(model)
    return counts


class RuleSweep(QCPass):
    """A pass applying rule groups in one :func:`sweep` (``fuse-rules``, and each group's own pass name)."""

    groups: ClassVar[tuple[RuleGroup, ...]] = ()
    needs_canonical = True  # canonicalize must see the unfused decoder (QCPass.needs_canonical)

    def selected(self) -> Sequence[RuleGroup]:
        return self.groups

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self.selected()
        counts = sweep(model, groups)
        for group in groups:
            record(self.context, group.name, counts[group.name])
            log.info("%s: %d %s", group.name, counts[group.name], group.what)
        return ir.passes.PassResult(model, modified=any(counts.values()))


def reaches(node: ir.Node, op: str, depth: int) -> bool:
    """Whether an ``op`` node is among the producers of ``node``'s inputs, at most ``depth`` steps up."""
    frontier = [node]
    for _ in range(depth):
        frontier = [p for n in frontier for v in n.inputs if v is not None and (p := v.producer()) is not None]
        if any(p.op_type == op for p in frontier):
            return True
    return False


def record(context: object, key: str, value: object) -> None:
    """Note a fusion count in the pass context's report (``report["fusion"][key]``)."""
    report = getattr(context, "report", None)
    if isinstance(report, dict):
        report.setdefault("fusion", {})[key] = value
