"""fuse-rmsnorm: RMSNorm subgraphs → ``SimplifiedLayerNormalization``.

    y = γ ⊙ x · 1/√(mean(x², axis=−1) + ε)  ≡  SimplifiedLayerNormalization(x, γ; axis=−1, epsilon=ε)

Written as onnxscript rewrite rules (pattern, check, replacement), one per form torch
exports: ``Pow(x, 2) | Mul(x, x) → ReduceMean → Add ε → Sqrt →
Reciprocal | Div(1, ·) → Mul(x, ·) → [Cast] → Mul γ`` and ``Div(x, √·)`` for the last
steps, with γ and each commutative step's operands in either order (as alternatives inside
the pattern: ``commute`` would try 2⁴ rule variants at every node); the same without γ
(then γ = 1).  The rules are tried only at Mul/Div nodes with a Sqrt a few steps up
(:func:`._fusion.sweep`, with the other rule fusions: ``fuse-rules``), not at every node as
``RewriteRuleSet`` would.  onnxscript's own
``ort_fusions.rms_normalization`` rule covers only ``Pow`` + ``Reciprocal``, needs γ and
does not check the reduced axis, so it is not used.  The check accepts exactly that
function: ε added *inside* the square root, ``x`` itself the input (torch's identity Cast of
the residual stays: the residual Add reads it too; later passes see through it), the mean over the last axis with
``keepdims=1``, every Cast an identity (same type in and out, so no precision change), γ a
constant vector of the input's type and width.  The rewriter itself refuses a match whose
intermediate values are read outside it.  ORT computes the fused op in float32
(``stash_type=1``), like the float32 subgraph it replaces.  A weightless norm inside a
γ-norm is left to the γ rule (its check fails when its output feeds ``Mul γ``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompiler.irutil import const_array, scalar_const
from qcompiler.pipeline import register_pass

from ._fusion import RuleGroup, RuleSweep, dims, reaches

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _is_gamma(v: ir.Value | None, x: ir.Value) -> bool:
    """A constant vector of ``x``'s type and width (read from the tensor's header, not its data)."""
    if v is None:
        return False
    node = v.producer()
    t = v.const_value if node is None else (node.attributes.get_tensor("value") if node.op_type == "Constant" else None)
    last = (dims(x) or [None])[-1]
    return (t is not None and len(t.shape) == 1 and t.dtype == x.dtype
            and (not isinstance(last, int) or t.shape[0] == last))


def _feeds_gamma(v: ir.Value, x: ir.Value) -> bool:
    """``v`` (through an identity Cast) is multiplied by a γ vector: the γ rule's match, not ours."""
    for use in v.uses():
        node = use.node
        if node.op_type == "Cast" and node.domain == "" and len(node.outputs[0].uses()) == 1:
            node = node.outputs[0].uses()[0].node
        if node.op_type == "Mul" and node.domain == "" and any(
                _is_gamma(i, x) or _is_gamma(i, node.outputs[0]) for i in node.inputs):  # γ_h after a narrowing Cast
            return True
    return False


class RMSNorm(pattern.RewriteRuleClassBase):
    """``[γ ⊙] x / √(mean(x²) + ε)`` → ``SimplifiedLayerNormalization(x, γ)``."""

    def __init__(self, name: str, weighted: bool, div: bool, swap: bool = False, widened: bool = False) -> None:
        super().__init__(name)
        self._weighted, self._div, self._swap = weighted, div, swap  # swap: the root's operands swapped
        self._widened = widened  # half-precision form: x is Cast_f32(x_h), the norm narrowed back before γ

    def pattern(self, op, x, two, axes, eps, one, gamma):  # type: ignore[no-untyped-def]
        if self._widened:  # x is x_h here; the norm reads its float32 widening
            x = op.Cast(x, _allow_other_attributes=True, _outputs=["widened"])
        # operand orders as alternatives inside one pattern, not as rule variants (``commute``
        # would make 2⁴ rules, each tried at every node: minutes on a 135M model)
        # (onnxscript 0.7 needs tag_var on an OrValue whose alternatives are not distinct ops)
        square = pattern.OrValue([op.Pow(x, two), op.Mul(x, x)], tag_var="square", tag_values=[0, 1])
        mean = op.ReduceMean(square, axes, _allow_other_attributes=True)
        total = pattern.OrValue([op.Add(mean, eps), op.Add(eps, mean)], tag_var="eps_side", tag_values=[0, 1])
        rms = op.Sqrt(total)
        if self._div:
            normed = op.Div(x, rms, _outputs=["normed"])
        else:
            inv = pattern.OrValue([op.Reciprocal(rms), op.Div(one, rms)], tag_var="inv", tag_values=[0, 1])
            if not self._weighted:
                return op.Mul(inv, x, _outputs=["normed"]) if self._swap else op.Mul(x, inv, _outputs=["normed"])
            normed = pattern.OrValue([op.Mul(x, inv), op.Mul(inv, x)], name="normed", tag_var="x_side",
                                     tag_values=[0, 1])
        if not self._weighted:
            return normed
        if self._widened:
            out = op.Cast(normed, _allow_other_attributes=True)
        else:
            out = pattern.OrValue([op.Cast(normed, _allow_other_attributes=True), normed], tag_var="cast_out",
                                  tag_values=[1, 0])
        return op.Mul(gamma, out) if self._swap else op.Mul(out, gamma)

    def check(self, context, x, axes, eps, normed, two=None, one=None, gamma=None,  # type: ignore[no-untyped-def]
              widened=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in FLOATS:
            return result.fail(f"input type {x.dtype} is not a known float type")
        widening = widened.producer() if widened is not None else None  # the half form's Cast_f32(x_h)
        if self._widened and (x.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) or widening is None
                              or widening.attributes.get_int("to", -1) != ir.DataType.FLOAT.value):
            return result.fail("not a half-precision norm widened to float32")
        for n in context.nodes:
            if n is widening:
                continue
            if n.op_type == "Cast" and n.attributes.get_int("to", -1) != (x.dtype.value if x.dtype else -2):
                return result.fail("a Cast inside the norm changes precision")
            if n.op_type == "ReduceMean" and n.attributes.get_int("keepdims", 1) != 1:
                return result.fail("the mean drops its axis")
        if two is not None and scalar_const(two) != 2.0:
            return result.fail("Pow exponent is not 2")
        if one is not None and scalar_const(one) != 1.0:
            return result.fail("Div numerator is not 1")
        if scalar_const(eps) is None:
            return result.fail("ε is not a constant scalar")
        ax = const_array(axes)
        rank = len(dims(x) or [])
        if ax is None or ax.size != 1 or int(ax.reshape(-1)[0]) not in (-1, rank - 1):
            return result.fail("the mean is not over the last axis")
        if self._weighted:
            if not _is_gamma(gamma, x):
                return result.fail("γ is not a constant vector of the input's type and width")
        else:
            if not isinstance((dims(x) or [None])[-1], int):
                return result.fail("weightless norm over an axis of unknown size")
            if _feeds_gamma(normed, x):
                return result.fail("the γ rule's norm")
        return result

    def rewrite(self, op, x, eps, gamma=None, **_):  # type: ignore[no-untyped-def]
        if gamma is None:
            gamma = op.Constant(value=ir.tensor(np.ones(int(dims(x)[-1]), x.dtype.numpy())))  # type: ignore[index,union-attr]
        return op.SimplifiedLayerNormalization(x, gamma, axis=-1, epsilon=float(scalar_const(eps)),  # type: ignore[arg-type]
                                               stash_type=1)


RULES = (
    [RMSNorm.rule(f"rmsnorm{'-gamma' if w else ''}{'-div' if d else ''}{'-swap' if sw else ''}", weighted=w, div=d,
                  swap=sw)
     for w in (True, False) for d in (False, True) for sw in (False, True) if not (d and sw and not w)]
    + [RMSNorm.rule(f"rmsnorm-half{'-div' if d else ''}{'-swap' if sw else ''}", weighted=True, div=d, swap=sw,
                    widened=True) for d in (False, True) for sw in (False, True)])


def _candidate(node: ir.Node) -> bool:
    """A root worth matching: a Mul/Div with a Sqrt at most four steps up (γ → Cast → Mul → Div → Sqrt), not a
    Div of a constant (the ``1/√·`` inside a norm, where no rule roots)."""
    return (node.op_type in ("Mul", "Div") and node.domain == ""
            and not (node.op_type == "Div" and scalar_const(node.inputs[0]) is not None) and reaches(node, "Sqrt", 4))


GROUP = RuleGroup("fuse-rmsnorm", RULES, _candidate, "RMSNorm subgraph(s) → SimplifiedLayerNormalization")


@register_pass
class FuseRMSNorm(RuleSweep):
    """RMSNorm subgraphs → SimplifiedLayerNormalization (see module docstring); ``fuse-rules`` runs it with the others."""

    name = "fuse-rmsnorm"
    groups = (GROUP,)
