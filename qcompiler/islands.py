"""float32 islands in an fp16 graph: which ops must not compute in fp16, from calibrated ranges.

fp16's largest finite value is ``M = 65504``; a value past it is ``inf`` and turns everything
after it into ``inf``/``NaN`` (``RMSNorm(inf) = inf/inf``).  Given the calibrated range
``[min_v, max_v]`` of every value ``v`` of an fp16 graph, measured on a float32-widened copy
(so a value past ``M`` is a number, not ``inf``), a value is **hot** when

    max_v > f·M   or   min_v < −f·M          (f: the safe fraction, default 1/2)

except that for a *softmax-bound* value (read only by ``Softmax``, or through ``Add``, ``Mul``,
``Cast``, ``Where`` and data-movement ops into one: the attention scores, the additive mask and
the mask's construction) only ``max_v`` counts: a large negative score is a zero probability
(``exp(−inf) = 0``), and the mask itself is ``−M`` by construction.  Only values computed from
the graph's inputs are candidates (reachable through data edges, not through ``Shape``/``Size``):
constants cannot change with the text.

The ops kept in float32 are every producer and every consumer of a hot value (so a hot value
never exists in fp16), plus, on the residual stream, the ``Add`` chain between the first and
the last hot residual ``Add`` (the *segment*: a massive activation written by one layer's
``down_proj`` rides the stream until the final norm; keeping the segment whole avoids an
fp16 round trip between two hot layers).  ``passes/keep_fp32.py`` rewrites them; ``qc
analyze`` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from qcompiler.floattype import FLOAT_TYPES, FP16_MAX

#: ops whose output carries no data of their input
SHAPE_OPS = frozenset({"Shape", "Size"})
#: ops whose output holds values of their input (hot when an input is: not observed, inherited)
MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Slice", "Concat", "Gather", "Split", "Squeeze", "Unsqueeze",
                          "Expand", "Identity", "Flatten", "Tile"})
#: ops whose output is bounded whatever their input (not observed)
BOUNDED_OPS = frozenset({"Softmax", "Sigmoid", "Tanh", "Cos", "Sin", "Erf"})
#: ops whose output is boolean
BOOL_OPS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                      "IsNaN", "IsInf"})
#: ops through which a value stays *softmax-bound* (its large negative values only mask)
SOFTMAX_PATH_OPS = frozenset({"Add", "Mul", "Cast", "Where", "Slice", "Expand", "Reshape", "Unsqueeze", "Squeeze",
                              "Transpose", "Concat", "Identity", "Gather", "Min", "Max", "Tile"})


@dataclass(frozen=True)
class IslandCriteria:
    """``fraction``: a value past ``fraction × 65504`` is hot (1/2: room for a text whose activations are
    twice the calibration text's; massive activations sit on the first tokens and vary little with the
    text.  SmolLM2-135M's residual stream reaches 24,205 on the GPL-3: 37% of the range, no island)."""

    fraction: float = 0.5

    @property
    def limit(self) -> float:
        return self.fraction * FP16_MAX


def value_types(model: ir.Model) -> dict[str, int]:
    """ONNX element type of every named value (the graph's own types, else ONNX shape inference)."""
    proto = ir.serde.serialize_model(model)
    for t in proto.graph.initializer:  # inference needs no weights
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int32_data")
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    floats = {int(d) for d in FLOAT_TYPES}
    for node in model.graph:  # what inference left open: a float op's output has its float inputs' type
        for o in node.outputs:
            if o.dtype is not None:
                types[o.name] = int(o.dtype)
        if all(o.name in types for o in node.outputs) or node.op_type in BOOL_OPS or node.op_type in SHAPE_OPS:
            continue
        if node.op_type == "Cast":
            t = node.attributes.get_int("to", 0)
        else:
            t = next((types[v.name] for v in node.inputs if v is not None and types.get(v.name) in floats), 0)
        if t:
            for o in node.outputs:
                types.setdefault(o.name, t)
    return types


def data_values(graph: ir.Graph) -> set[str]:
    """Names of the values computed from the graph's inputs (see module docstring)."""
    live = {v.name for v in graph.inputs if v.name}
    for node in graph:
        if node.op_type in SHAPE_OPS:
            continue
        if any(v is not None and v.name in live for v in node.inputs):
            live.update(o.name for o in node.outputs if o.name)
    return live


def candidates(model: ir.Model, types: Mapping[str, int] | None = None) -> list[str]:
    """fp16 node outputs computed from the inputs, in graph order: the values to calibrate (outputs of
    :data:`MOVEMENT_OPS` inherit their input's status, those of :data:`BOUNDED_OPS` cannot overflow)."""
    types = value_types(model) if types is None else types
    live = data_values(model.graph)
    return [o.name for node in model.graph if node.op_type not in MOVEMENT_OPS | BOUNDED_OPS for o in node.outputs
            if o.name in live and types.get(o.name) == onnx.TensorProto.FLOAT16]


def softmax_bound(graph: ir.Graph) -> set[str]:
    """Values read only by ``Softmax`` (its input), directly or through :data:`SOFTMAX_PATH_OPS`."""
    bound: set[str] = set()
    outputs = {v.name for v in graph.outputs}
    for node in reversed(list(graph)):
        for o in node.outputs:
            uses = list(o.uses())
            if not uses or o.name in outputs:
                continue
            if all((u.op_type == "Softmax" and j == 0)
                   or (u.op_type in SOFTMAX_PATH_OPS and all(x.name in bound for x in u.outputs)) for u, j in uses):
                bound.add(o.name)
    return bound


def counted(lo: float, hi: float, softmax_input: bool) -> float:
    """The magnitude of a value's range that can overflow: ``max`` for a softmax-bound value, else ``max|x|``."""
    return hi if softmax_input else max(abs(lo), abs(hi))


def hot_values(ranges: Mapping[str, tuple[float, float]], bound: Iterable[str],
               crit: IslandCriteria = IslandCriteria()) -> dict[str, float]:
    """``{value: max|x| that counts}`` of the hot values among ``ranges`` (``name → (min, max)``)."""
    bound = set(bound)
    hot = {}
    for name, (lo, hi) in ranges.items():
        top = counted(lo, hi, name in bound)
        if math.isnan(lo) or math.isnan(hi) or top > crit.limit:
            hot[name] = float(top)
    return hot


def _residual_segment(graph: ir.Graph, hot_adds: list[ir.Node]) -> list[ir.Node]:
    """The residual ``Add`` chain from the last hot ``Add`` back to the first (empty if not one chain)."""
    pos = {n: i for i, n in enumerate(graph)}
    first, last = min(hot_adds, key=pos.__getitem__), max(hot_adds, key=pos.__getitem__)
    chain, node = [], last
    while node is not None and node is not first:
        chain.append(node)
        prev = [v.producer() for v in node.inputs if v is not None and v.producer() is not None
                and v.producer().op_type == "Add"]  # type: ignore[union-attr]
        node = min(prev, key=pos.__getitem__) if prev else None  # the stream: the earlier of two Adds
        if node is not None and pos[node] < pos[first]:
            return []
    return chain if node is first else []


def select_nodes(graph: ir.Graph, hot: Iterable[str]) -> list[ir.Node]:
    """The nodes to keep in float32 (graph order): producers and consumers of ``hot`` values and
    the residual segment between the hot residual ``Add``s."""
    hot = set(hot)
    keep: set[ir.Node] = set()
    for node in graph:
        if node.op_type in MOVEMENT_OPS and any(v is not None and v.name in hot for v in node.inputs):
            hot.update(o.name for o in node.outputs)  # the same values, moved
        for o in node.outputs:
            if o.name in hot:
                keep.add(node)
                keep.update(u for u, _ in o.uses())
    hot_adds = [n for n in keep if n.op_type == "Add" and any(o.name in hot for o in n.outputs)]
    if len(hot_adds) > 1:
        keep.update(_residual_segment(graph, hot_adds))
    return [n for n in graph if n in keep]


def islands(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """``nodes`` split into connected islands (linked by a value one produces and another reads)."""
    members = set(nodes)
    parent = {n: n for n in nodes}

    def find(n: ir.Node) -> ir.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p in members:
                parent[find(n)] = find(p)  # type: ignore[arg-type]
    groups: dict[ir.Node, list[ir.Node]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())
