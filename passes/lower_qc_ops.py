"""lower-qc-ops: per-token W8A8 and outlier-split GEMMs → qcompiler's custom ops (cuda target).

Same function, one fused kernel.  The portable per-token form computes::

    s = max(max_k |X|, ε)/127,  X̂ = clip(round(X/s), −127, 127)·s,  Y = X̂·(W_q·s_w)
      = (clip(round(X/s))·W_q)·s·s_w            (the scales factor out of the integer product)

which is exactly ``qcompiler.W8A8MatMul(X, W_qᵀ, s_w)``; a following ``Add`` of a
constant ``[N]`` folds in as its ``bias``.  The portable outlier-split form
(:mod:`qcompiler.ops.emit`) ``per_token(X·keep)·Ŵ + X[:, idx]·W_o`` is
``qcompiler.W8A8OutlierMatMul(X, W_qᵀ, s_w, idx, W_o)``: zeroing the outlier channels
before the row max is the op's "outliers left out of the scale".  ONNX Runtime's CUDA
provider has neither op.  Static per-tensor W8A8 (Q/DQ) is left as is: the CUDA
provider runs QuantizeLinear/DequantizeLinear itself.

``X`` and ``Y`` are float32, float16 or bfloat16 (the graph's type: a bf16 graph is for the
cuda target); ``s_w`` and the folded bias are float32 constants whatever the graph holds
(the op scales its int32 sums in float32 and rounds ``Y`` once).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qcompiler.passes._lowering import base_name, following_bias, remove_dead, take_over

from qcompiler.floattype import FLOAT_TYPES
from qcompiler.irutil import QC_DOMAIN, ensure_opset, remove_unused_initializers
from qcompiler.ops.emit import OP_VERSION, make_qc_gemm, match_outlier_split
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.w8a8 import W8A8Match, w8a8_matmuls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowerQcOpsConfig:
    per_token: bool = True  # lower per-token W8A8 MatMuls to W8A8MatMul
    outlier_split: bool = True  # lower outlier-split GEMMs to W8A8OutlierMatMul
    fold_bias: bool = True  # fold a following constant bias Add into the op


@register_pass
class LowerQcOps(QCPass):
    """Rewrite per-token W8A8 / outlier-split GEMMs into qcompiler.W8A8MatMul / W8A8OutlierMatMul."""

    name = "lower-qc-ops"
    Config = LowerQcOpsConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts: Counter[str] = Counter()
        if self.config.outlier_split:
            for node in list(graph):
                if node.graph is graph and node.op_type == "Add":
                    m = match_outlier_split(node)
                    if m is not None and self._lower(graph, m.int8, m.add, m.nodes, m.x, m.outlier_idx, m.w_outlier):
                        counts["W8A8OutlierMatMul"] += 1
        for m in w8a8_matmuls(graph):
            if m.kind != "per-token":
                counts["static W8A8 left as QDQ"] += 1
            elif self.config.per_token and self._lower(graph, m, m.matmul, m.nodes, m.x):
                counts["W8A8MatMul"] += 1
        lowered = counts["W8A8MatMul"] + counts["W8A8OutlierMatMul"]
        if lowered:
            remove_unused_initializers(graph)
            ensure_opset(model, QC_DOMAIN, OP_VERSION)
        self.context.report[self.name] = dict(counts)
        log.info("lower-qc-ops: %s", ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing to lower")
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _lower(self, graph: ir.Graph, m: W8A8Match, last: ir.Node, nodes: tuple[ir.Node, ...], x: ir.Value,
               outlier_idx: np.ndarray | None = None, w_outlier: np.ndarray | None = None) -> bool:
        wdq = m.matmul.inputs[1].producer() if m.matmul.inputs[1] is not None else None
        scale_v = wdq.inputs[1] if wdq is not None else None
        known = next((v.dtype for v in (x, m.matmul.outputs[0], scale_v) if v is not None and v.dtype is not None),
                     None)
        if known not in FLOAT_TYPES:
            log.info("lower-qc-ops: %s is not float32/float16/bfloat16; left as is", m.matmul.name)
            return False
        y = last.outputs[0]
        n = m.w_q.shape[1]
        bias = following_bias(y, n) if self.config.fold_bias else None
        base = base_name(m.matmul)
        node = make_qc_gemm(graph, x, m.w_q, m.w_scale, base, bias=bias[0] if bias else None,
                            outlier_idx=outlier_idx, w_outlier=w_outlier)
        node.meta.update(m.matmul.meta)
        node.metadata_props.update(m.matmul.metadata_props)
        graph.insert_before(m.matmul, node)
        take_over(node.outputs[0], bias[1].outputs[0] if bias else y)
        remove_dead(graph, [*nodes, *((bias[1],) if bias else ())])
        return True
