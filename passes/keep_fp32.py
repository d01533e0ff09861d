"""keep-fp32: the ops of an fp16 graph whose values pass fp16's range compute in float32.

fp16 holds ``|x| ≤ 65504``; models with massive activations (a ``down_proj`` writing ~10⁵
into one residual channel, Sun et al. 2024) make ``inf`` there, then ``NaN`` at the next
norm.  Keeping the whole model in float32 doubles every float byte; keeping the few ops that
overflow costs a few Casts.

1. **Measure wide.**  Every fp16 value computed from the inputs gets a ``minmax`` observer on
   (at most ``samples`` windows of) the calibration text, on a float32-widened copy of the graph
   (:data:`qcompiler.calibrate.graph.WIDEN_META`: initializers read through ``Cast``, Casts
   to fp16 retargeted), so a value past 65504 is measured instead of being ``inf``.
2. **Select** (:mod:`qcompiler.islands`): hot values pass ``fraction × 65504`` (default 1/2;
   softmax inputs: only upward); the ops kept are their producers and consumers, plus the residual
   ``Add`` segment between the first and last hot residual ``Add``.
3. **Rewrite** each kept node ``n`` to compute in float32, which is exact for the island
   (float32 ⊇ fp16) and changes nothing outside it::

       fp16 input  v from outside   →  Cast(v, to=float32)        (one per value, shared)
       fp16 weight / constant  W    →  W as a float32 initializer (fp16 → float32 is exact)
       Cast(to=fp16) inside         →  Cast(to=float32)
       fp16 output o read outside   →  o in float32 + Cast(o, to=fp16) under o's old name

   A hot value is read only inside the island, so it never exists in fp16; what leaves
   the island is below the limit, so its Cast back is finite.

Weights of island linears are widened, not dequantized: the pass runs right after
``canonicalize``, before any quantizing pass, so a kept ``down_proj`` is then quantized like
any other linear, its scales following its (float32) type — int4/int8 codes as everywhere,
float32 scales and activation for that linear only (a few KB), and ``MatMulNBits`` /
the W8A8 kernels run it in float32.  Without ``--calib`` (or on an fp32/bf16 graph) the pass
does nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.calibrate import StatRequest, fewer_windows
from qcompiler.calibrate.graph import WIDEN_META
from qcompiler.floattype import graph_float_type, type_name
from qcompiler.irutil import add_initializer, remove_unused_initializers, unique_name
from qcompiler.islands import (
    IslandCriteria,
    candidates,
    counted,
    hot_values,
    islands,
    select_nodes,
    softmax_bound,
    value_types,
)
from qcompiler.pipeline import QCPass, register_pass

log = logging.getLogger(__name__)

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


@dataclass(frozen=True)
class KeepFp32Config:
    fraction: float = 0.5  # a value past fraction × 65504 is hot (IslandCriteria)
    samples: int = 32  # calibration windows observed at most (0: all the recipe's): a range, not a Hessian


@register_pass
class KeepFp32(QCPass):
    """Keep the ops whose calibrated values pass (a fraction of) fp16's range in float32."""

    name = "keep-fp32"
    Config = KeepFp32Config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        dtype = graph_float_type(graph)
        if dtype != F16:
            self.context.report[self.name] = {"skipped": f"the graph is {type_name(dtype)}, not fp16"}
            return ir.passes.PassResult(model, modified=False)
        if self.context.calibrate is None:
            log.warning("keep-fp32: no calibration text: activations past fp16's 65504 are not looked for "
                        "(pass --calib TEXT; docs/half.md)")
            self.context.report[self.name] = {"skipped": "no calibration text"}
            return ir.passes.PassResult(model, modified=False)
        crit = IslandCriteria(self.config.fraction)
        types = value_types(model)
        names = candidates(model, types)
        calibrate = fewer_windows(self.context.calibrate, self.config.samples)
        graph.meta[WIDEN_META] = True
        try:
            stats = calibrate(model, [StatRequest(v, ("minmax",)) for v in names])
            ranges = {v: (stats.get(v, "minmax").min, stats.get(v, "minmax").max) for v in names}
        finally:
            del graph.meta[WIDEN_META]
        bound = softmax_bound(graph)
        hot = hot_values(ranges, bound, crit)
        nodes = select_nodes(graph, hot)
        top = max((counted(lo, hi, v in bound) for v, (lo, hi) in ranges.items()), default=0.0)
        report = {"limit": crit.limit, "fraction": crit.fraction, "values_checked": len(names),
                  "max_abs": float(top), "hot_values": {k: round(v, 1) for k, v in hot.items()}}
        if not nodes:
            report["islands"] = []
            self.context.report[self.name] = report
            log.info("keep-fp32: no value past %.0f (max |x| = %.4g over %d values): no island",
                     crit.limit, top, len(names))
            return ir.passes.PassResult(model, modified=False)
        groups = islands(nodes)
        counts = keep_in_float32(graph, nodes, types)
        remove_unused_initializers(graph)
        report["islands"] = [{"nodes": [n.name for n in g], "ops": dict(Counter(n.op_type for n in g))} for g in groups]
        report["rewrites"] = dict(counts)
        self.context.report[self.name] = report
        log.info("keep-fp32: %d value(s) past %.0f (max %.4g): %d op(s) in %d float32 island(s), %s", len(hot),
                 crit.limit, top, len(nodes), len(groups), ", ".join(f"{v} {k}" for k, v in counts.items()))
        return ir.passes.PassResult(model, modified=True)


def keep_in_float32(graph: ir.Graph, nodes: list[ir.Node], types: dict[str, int]) -> Counter[str]:
    """Rewrite ``nodes`` (graph order) to compute in float32 (see module docstring)."""
    members = set(nodes)
    widened: dict[ir.Value, ir.Value] = {}
    counts: Counter[str] = Counter()

    def half(v: ir.Value | None) -> bool:
        return v is not None and (v.dtype == F16 or (v.dtype is None and types.get(v.name) == F16.value))

    def wide(v: ir.Value) -> ir.Value:
        if v in widened:
            return widened[v]
        prod = v.producer()
        tensor = v.const_value if v.is_initializer() else None
        if tensor is None and prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
            tensor = prod.attributes["value"].value
        if tensor is not None:  # a weight or constant: widened once, exactly
            w = add_initializer(graph, f"{v.name}_fp32", np.asarray(tensor.numpy(), np.float32))
            counts["float32 constants"] += 1
        else:
            cast = ir.node("Cast", [v], {"to": F32.value}, name=unique_name(graph, f"{v.name}_to_fp32"))
            w = cast.outputs[0]
            w.name, w.type, w.shape = unique_name(graph, f"{v.name}_fp32"), ir.TensorType(F32), v.shape
            if prod is None:
                graph.insert_before(next(iter(graph)), cast)
            else:
                graph.insert_after(prod, cast)
            counts["Casts in"] += 1
        widened[v] = w
        return w

    for node in nodes:
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) == F16.value:
            node.attributes["to"] = ir.AttrInt64("to", F32.value)
        for i, v in enumerate(node.inputs):
            if half(v) and v.producer() not in members:  # type: ignore[union-attr]
                node.replace_input_with(i, wide(v))  # type: ignore[arg-type]
        for o in node.outputs:
            if not half(o):
                continue
            outside = [(u, j) for u, j in o.uses() if u not in members]
            graph_out = [k for k, g in enumerate(graph.outputs) if g is o]
            o.type = ir.TensorType(F32)
            if not outside and not graph_out:
                continue
            name = o.name
            o.name = unique_name(graph, f"{name}_fp32")
            cast = ir.node("Cast", [o], {"to": F16.value}, name=unique_name(graph, f"{name}_to_fp16"))
            back = cast.outputs[0]
            back.type, back.shape = ir.TensorType(F16), o.shape
            graph.insert_after(node, cast)
            for u, j in outside:
                u.replace_input_with(j, back)
            for k in graph_out:
                graph.outputs[k] = back
            back.name = name
            counts["Casts out"] += 1
    return counts
