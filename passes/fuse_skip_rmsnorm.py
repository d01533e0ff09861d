"""fuse-skip-rmsnorm: residual ``Add`` + ``SimplifiedLayerNormalization`` → ``SkipSimplifiedLayerNormalization``.

    s = a + b,   y = RMSNorm_γ,ε(s)   ≡   (y, s) = SkipSimplifiedLayerNormalization(a, b, γ; ε)

with ``s`` taken from the fused op's fourth output (``input_skip_bias_sum``) for every
other reader of the residual stream (the next residual Add).  Rooted at the norm that
``fuse-rmsnorm`` makes (in ``fuse-rules``' sweep, as soon as it makes it).  Written as
onnxscript rewrite rules (pattern, check, replacement), tried only at
``SimplifiedLayerNormalization`` nodes: an identity ``Cast`` between the Add and the norm (torch's export casts the residual to
float32 inside each norm, a no-op for float32 models) is part of the pattern, which
onnxscript's own ``ort_fusions.skip_normalization`` rule lacks (it also insists on rank 3
and on γ's dims, which this check covers in the same way).  The check requires ``a``
and ``b`` to have the same known shape, rank 2 or 3 (no broadcasting: the kernel adds
element for element), the norm over the last axis, float32 statistics, and γ of the sum's
type.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompiler.irutil import MS_DOMAIN
from qcompiler.pipeline import register_pass

from ._fusion import RuleGroup, RuleSweep, dims, same_dim


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    da, db = dims(a), dims(b)
    return (da is not None and db is not None and len(da) == len(db) and len(da) in (2, 3)
            and all(same_dim(x, y) for x, y in zip(da, db)))


class SkipRMSNorm(pattern.RewriteRuleClassBase):
    """``RMSNorm(a + b)`` → ``SkipSimplifiedLayerNormalization(a, b)``, with or without an identity Cast."""

    def __init__(self, name: str, cast: bool) -> None:
        super().__init__(name, remove_nodes=True)
        self._cast = cast

    def pattern(self, op, a, b, gamma, to):  # type: ignore[no-untyped-def]
        s = op.Add(a, b, _outputs=["s"])
        x = op.Cast(s, to=to, _outputs=["x"]) if self._cast else s
        y = op.SimplifiedLayerNormalization(x, gamma, _allow_other_attributes=True, _outputs=["y"])
        return (y, s, x) if self._cast else (y, s)  # the identity Cast's readers get the sum too

    def check(self, context, a, b, gamma, s, y, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        norm = y.producer()
        if self._cast:
            cast = norm.inputs[0].producer()
            if cast.attributes.get_int("to", -1) != (s.dtype.value if s.dtype is not None else -2):
                return result.fail("the Cast changes precision")
        if a.const_value is not None or b.const_value is not None:
            return result.fail("a constant operand (a bias, not a residual)")
        if not _same_shape(a, b):
            return result.fail("the residual operands' shapes are not known equal")
        if norm.attributes.get_int("axis", -1) not in (-1, len(dims(a) or []) - 1):
            return result.fail("the norm is not over the last axis")
        if norm.attributes.get_int("stash_type", 1) != 1:
            return result.fail("statistics not in float32")
        if len(norm.outputs) > 1 and any(o.uses() for o in norm.outputs[1:]):
            return result.fail("the norm's statistics are read")
        if s.dtype != gamma.dtype:
            return result.fail("γ and the sum differ in type")
        return result

    def rewrite(self, op, a, b, gamma, y, **_):  # type: ignore[no-untyped-def]
        eps = y.producer().attributes.get_float("epsilon", 1e-5)
        normed, _mean, _inv, total = op.SkipSimplifiedLayerNormalization(
            a, b, gamma, epsilon=eps, _outputs=4, _domain=MS_DOMAIN)
        return (normed, total, total) if self._cast else (normed, total)


RULES = (SkipRMSNorm.rule("skip-rmsnorm-cast", cast=True), SkipRMSNorm.rule("skip-rmsnorm", cast=False))


def _candidate(node: ir.Node) -> bool:
    return node.op_type == "SimplifiedLayerNormalization" and node.domain == ""


GROUP = RuleGroup("fuse-skip-rmsnorm", RULES, _candidate, "residual Add + RMSNorm → SkipSimplifiedLayerNormalization",
                  domain=MS_DOMAIN)


@register_pass
class FuseSkipRMSNorm(RuleSweep):
    """Residual Add + SimplifiedLayerNormalization → SkipSimplifiedLayerNormalization; ``fuse-rules`` runs it too."""

    name = "fuse-skip-rmsnorm"
    groups = (GROUP,)
