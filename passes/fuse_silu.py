"""fuse-silu: ``x · sigmoid(x)`` → ``com.microsoft.QuickGelu(x; alpha=1)``.

    QuickGelu_α(x) = x · σ(α·x),   so   QuickGelu₁(x) = x · σ(x) = SiLU(x)

The SwiGLU MLP's ``act(gate) ⊙ up`` keeps its product Mul (ONNX Runtime has no CPU
kernel for a fused SwiGLU); the activation becomes one op instead of two, computed
by the same vectorized logistic (bit-identical on ONNX Runtime CPU).  Only the exact
form is rewritten: the Sigmoid reads the same value the Mul multiplies, and nothing
else reads the Sigmoid.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qcompiler.irutil import MS_DOMAIN, ensure_opset
from qcompiler.pipeline import QCPass, register_pass

from ._fusion import cleanup, new_node, record, replace_value

log = logging.getLogger(__name__)


def _silu_input(mul: ir.Node) -> ir.Value | None:
    if mul.op_type != "Mul" or mul.domain != "" or len(mul.inputs) != 2:
        return None
    for i in (0, 1):
        sig = mul.inputs[1 - i].producer() if mul.inputs[1 - i] is not None else None
        if (sig is not None and sig.op_type == "Sigmoid" and sig.domain == "" and sig.inputs[0] is mul.inputs[i]
                and len(sig.outputs[0].uses()) == 1 and not sig.outputs[0].is_graph_output()):
            return mul.inputs[i]
    return None


@register_pass
class FuseSiLU(QCPass):
    """x·sigmoid(x) → com.microsoft.QuickGelu(alpha=1) (see module docstring)."""

    name = "fuse-silu"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for mul in list(graph):
            x = _silu_input(mul)
            if x is None:
                continue
            fused = new_node(graph, "QuickGelu", [x], f"{mul.name or 'silu'}_QuickGelu", attributes={"alpha": 1.0},
                             domain=MS_DOMAIN)
            graph.insert_before(mul, fused)
            replace_value(graph, mul.outputs[0], fused.outputs[0])
            count += 1
        if count:
            ensure_opset(model, MS_DOMAIN, 1)
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-silu: %d x·sigmoid(x) → QuickGelu", count)
        return ir.passes.PassResult(model, modified=count > 0)
