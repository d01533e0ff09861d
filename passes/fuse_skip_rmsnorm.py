"""fuse-skip-rmsnorm: residual ``Add`` + ``SimplifiedLayerNormalization`` → ``SkipSimplifiedLayerNormalization``.

    s = a + b,   y = RMSNorm_γ,ε(s)   ≡   (y, s) = SkipSimplifiedLayerNormalization(a, b, γ; ε)

with ``s`` taken from the fused op's fourth output (``input_skip_bias_sum``) for every
other reader of the residual stream (the next residual Add).  Run after
``fuse-rmsnorm``.  Identity Casts between the Add and the norm (torch's export casts
the residual to float32 inside each norm, a no-op for float32 models) are looked
through.  The fusion requires ``a`` and ``b`` to have the same known shape, rank 2 or 3
(no broadcasting), since the kernel adds them element for element.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qcompiler.irutil import MS_DOMAIN, ensure_opset
from qcompiler.pipeline import QCPass, register_pass

from ._fusion import cleanup, dims, infer_shapes, is_identity_cast, new_node, record, replace_value, same_dim

log = logging.getLogger(__name__)


def _residual_add(norm: ir.Node) -> tuple[ir.Node, list[ir.Node]] | None:
    """The Add feeding ``norm`` (through identity casts) and those casts."""
    casts: list[ir.Node] = []
    v = norm.inputs[0]
    while v is not None and v.producer() is not None and is_identity_cast(v.producer()):
        casts.append(v.producer())
        v = v.producer().inputs[0]
    add = v.producer() if v is not None else None
    if add is None or add.op_type != "Add" or add.domain != "":
        return None
    return add, casts


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    da, db = dims(a), dims(b)
    return (da is not None and db is not None and len(da) == len(db) and len(da) in (2, 3)
            and all(same_dim(x, y) for x, y in zip(da, db)))


@register_pass
class FuseSkipRMSNorm(QCPass):
    """Residual Add + SimplifiedLayerNormalization → SkipSimplifiedLayerNormalization."""

    name = "fuse-skip-rmsnorm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        infer_shapes(model)
        count = 0
        for norm in list(graph):
            if norm.op_type != "SimplifiedLayerNormalization" or norm.domain != "" or (len(norm.outputs) > 1 and any(
                o.uses() for o in norm.outputs[1:]
            )):
                continue
            found = _residual_add(norm)
            if found is None:
                continue
            add, casts = found
            a, b = add.inputs
            if a is None or b is None or a.const_value is not None or b.const_value is not None:
                continue
            if not _same_shape(a, b):
                log.info("fuse-skip-rmsnorm: %s left unfused: the residual operands' shapes are not known equal",
                         add.name)
                continue
            if norm.attributes.get_int("axis", -1) not in (-1, len(dims(a) or []) - 1):
                continue
            if add.outputs[0].dtype != norm.inputs[1].dtype:
                continue
            eps = norm.attributes.get_float("epsilon", 1e-5)
            fused = new_node(
                graph, "SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]],
                f"{add.name}_SkipSimplifiedLayerNorm", attributes={"epsilon": eps}, domain=MS_DOMAIN,
                output_names=[f"{norm.name}_out", None, None, f"{add.name}_sum"],
            )
            graph.insert_before(norm, fused)
            replace_value(graph, norm.outputs[0], fused.outputs[0])
            for c in casts:
                replace_value(graph, c.outputs[0], fused.outputs[3])
            replace_value(graph, add.outputs[0], fused.outputs[3])
            count += 1
        if count:
            ensure_opset(model, MS_DOMAIN, 1)
            cleanup(model)
        record(self.context, self.name, count)
        log.info("fuse-skip-rmsnorm: %d residual Add + RMSNorm → SkipSimplifiedLayerNormalization", count)
        return ir.passes.PassResult(model, modified=count > 0)
