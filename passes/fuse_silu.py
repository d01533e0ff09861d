"""fuse-silu: ``x · sigmoid(x)`` → ``com.microsoft.QuickGelu(x; alpha=1)``.

    QuickGelu_α(x) = x · σ(α·x),   so   QuickGelu₁(x) = x · σ(x) = SiLU(x)

The SwiGLU MLP's ``act(gate) ⊙ up`` keeps its product Mul (ONNX Runtime has no CPU
kernel for a fused SwiGLU); the activation becomes one op instead of two, computed
by the same vectorized logistic (bit-identical on ONNX Runtime CPU).  Written as one
onnxscript rewrite rule (pattern ``Mul(x, Sigmoid(x))`` in both operand orders; the
rewriter removes the Sigmoid only when nothing else reads it, so a Sigmoid with other
readers is left alone by the check), tried only at Mul nodes reading a Sigmoid
(:func:`._fusion.sweep`, with the other rule fusions: ``fuse-rules``).  onnxscript's ``ort_fusions`` has no SiLU rule.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompiler.irutil import MS_DOMAIN
from qcompiler.pipeline import register_pass

from ._fusion import RuleGroup, RuleSweep, reaches


class SiLU(pattern.RewriteRuleClassBase):
    """``Mul(x, Sigmoid(x))`` → ``QuickGelu(x; alpha=1)``."""

    def pattern(self, op, x):  # type: ignore[no-untyped-def]
        return op.Mul(x, op.Sigmoid(x, _outputs=["sig"]))

    def check(self, context, x, sig, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if len(sig.uses()) != 1 or sig.is_graph_output():
            return result.fail("the Sigmoid has other readers")
        return result

    def rewrite(self, op, x, **_):  # type: ignore[no-untyped-def]
        return op.QuickGelu(x, alpha=1.0, _domain=MS_DOMAIN)


RULES = SiLU.rule("silu").commute()  # x·σ(x) and σ(x)·x


def _candidate(node: ir.Node) -> bool:
    return node.op_type == "Mul" and node.domain == "" and reaches(node, "Sigmoid", 1)


GROUP = RuleGroup("fuse-silu", RULES, _candidate, "x·sigmoid(x) → QuickGelu", shapes=False, domain=MS_DOMAIN)


@register_pass
class FuseSiLU(RuleSweep):
    """x·sigmoid(x) → com.microsoft.QuickGelu(alpha=1) (see module docstring); ``fuse-rules`` runs it with the others."""

    name = "fuse-silu"
    groups = (GROUP,)
