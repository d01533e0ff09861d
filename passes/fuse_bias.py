"""fuse-bias: ``Add(linear(X), b)`` → the linear kernel's own bias input.

    X·Ŵ + b  =  MatMulNBits(X, B, scales[, zero_points]; bias=b)

for ``com.microsoft.MatMulNBits`` (bias input 5), ``DynamicQuantizeMatMul`` (input 4)
and ``MatMulIntegerToFloat`` (input 6): the kernels add the bias to each output row,
which is the broadcast ``Add`` of a constant vector ``b[N]``.  Only a constant bias of
exactly N elements, the linear's sole consumer, on a linear without a bias yet, of the
same float type is folded.  (Float ``MatMul`` + ``Add`` is left to ONNX Runtime's own
MatMul/Add fusion.)
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import MS_DOMAIN, add_initializer, const_array
from qcompiler.pipeline import QCPass, register_pass

from ._fusion import cleanup, record, replace_value

log = logging.getLogger(__name__)

#: op → bias input slot
BIAS_SLOT = {"MatMulNBits": 5, "DynamicQuantizeMatMul": 4, "MatMulIntegerToFloat": 6}


def _out_features(node: ir.Node) -> int | None:
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N", 0) or None
    w = node.inputs[1].const_value if node.inputs[1] is not None else None
    return int(w.shape[1]) if w is not None and len(w.shape) == 2 else None


@register_pass
class FuseBias(QCPass):
    """Fold a constant bias Add into MatMulNBits / DynamicQuantizeMatMul / MatMulIntegerToFloat."""

    name = "fuse-bias"
    needs_canonical = True  # canonicalize must see the unfused decoder (QCPass.needs_canonical)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            slot = BIAS_SLOT.get(node.op_type) if node.domain == MS_DOMAIN else None
            if slot is None or (len(node.inputs) > slot and node.inputs[slot] is not None):
                continue
            y = node.outputs[0]
            uses = y.uses()
            if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add" or uses[0].node.domain != "":
                continue
            add = uses[0].node
            bias = const_array(add.inputs[1 - uses[0].idx])
            n = _out_features(node)
            if bias is None or n is None or bias.size != n or bias.shape[-1] != n:
                continue
            scale = node.inputs[2] if len(node.inputs) > 2 else None  # scales have the float type of the output
            s_type = scale.const_value.dtype if scale is not None and scale.const_value is not None else scale.dtype if scale else None
            if s_type is None or bias.dtype != s_type.numpy():
                continue
            b = add_initializer(graph, f"{node.name or 'linear'}_bias", np.ascontiguousarray(bias.reshape(n)))
            if len(node.inputs) <= slot:
                node.resize_inputs(slot + 1)
            node.replace_input_with(slot, b)
            replace_value(graph, add.outputs[0], y)
            count += 1
        if count:
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-bias: %d bias Add(s) folded into their linear", count)
        return ir.passes.PassResult(model, modified=count > 0)
