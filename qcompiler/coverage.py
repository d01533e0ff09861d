"""The coverage contract: every weight-carrying linear is quantized or listed with a reason.

After any recipe or pipeline, each ``MatMul``/``Gemm`` whose weight is a float constant
(:func:`qcompiler.irutil.linear_weight`) is *kept float*; every other linear reads an
integer weight (``MatMulNBits``, ``MatMulIntegerToFloat``, ``MatMul(X, DequantizeLinear(q, ...))``
...) and is *quantized*.  A kept-float linear carries its reason:

* a pass that deliberately leaves a linear in float says why with :func:`mark_kept_float`
  (user exclusion ``skip=``, NaN/Inf weights, sensitivity, lm_head by choice, ...);
* an lm_head without a mark is ``lm_head by choice`` (``--lm-head`` quantizes an untied one);
* anything else — a linear canonicalize did not recognize, or one no pass handled — is an
  **unsupported pattern**; so is a ``MatMul`` whose weight is a float constant of rank ≥ 3
  (stacked mixture-of-experts weights ``[E, K, N]``, as gpt_oss exports them), which no pass
  quantizes yet.

:func:`enforce` raises :class:`UnsupportedModelError` (exit 5) with one line naming the
family (``config.json``'s ``model_type``), the count and the first node names when a
decoder linear is kept float for an unsupported pattern, unless partial output is
allowed; and it always refuses a model in which nothing at all was quantized.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from qcompiler.errors import UnsupportedModelError
from qcompiler.families.rules import reaches_output
from qcompiler.irutil import linear_weight
from qcompiler.spec import Role, linear_info

log = logging.getLogger(__name__)

KEPT_FLOAT_KEY = "qc.kept_float"
UNSUPPORTED = "unsupported pattern"
LM_HEAD_CHOICE = "lm_head by choice (--lm-head quantizes an untied lm_head)"
ROUTER_CHOICE = "mixture-of-experts router by choice (expert selection is sensitive; a few KB)"
OUTLIER_SIDE = "outlier input channels (LLM.int8 float side product)"
LM_HEAD_TIED = "lm_head tied to the embedding (one tensor; --quantize-embeddings quantizes both)"
_INT_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4})
_THROUGH = frozenset({"DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity"})


def mark_kept_float(node: ir.Node, reason: str) -> None:
    """Record that a pass deliberately leaves ``node`` (a linear) in float, and why."""
    node.meta[KEPT_FLOAT_KEY] = reason
    node.metadata_props[KEPT_FLOAT_KEY] = reason


@dataclass(frozen=True)
class KeptFloat:
    """One float linear: its node name, role key (``layers.3.up_proj``, ``lm_head``, or None) and reason."""

    node: str
    role: str | None
    reason: str

    def to_dict(self) -> dict[str, str | None]:
        return {"node": self.node, "role": self.role, "reason": self.reason}


@dataclass
class Coverage:
    quantized: int = 0
    kept_float: list[KeptFloat] = field(default_factory=list)

    @property
    def unsupported(self) -> list[KeptFloat]:
        return [k for k in self.kept_float if k.reason == UNSUPPORTED]

    def to_dict(self) -> dict[str, object]:
        return {"quantized": self.quantized, "kept_float": len(self.kept_float),
                "unsupported": len(self.unsupported)}


def _integer_weight(value: ir.Value | None, depth: int = 3) -> bool:
    """``value`` is an integer constant of rank ≥ 2, possibly behind DequantizeLinear/Transpose/Reshape."""
    for _ in range(depth):
        if value is None:
            return False
        if value.const_value is not None:
            return value.const_value.dtype in _INT_TYPES and len(value.const_value.shape) >= 2
        node = value.producer()
        if node is None or node.op_type not in _THROUGH:
            return False
        value = node.inputs[0]
    return False


def is_quantized_linear(node: ir.Node) -> bool:
    """A matrix product reading an integer weight (any lowering: QDQ, MatMulNBits, integer GEMMs)."""
    if node.op_type in ("Gather", "GatherBlockQuantized", "DequantizeLinear", "QuantizeLinear", "GatherElements"):
        return False
    return any(_integer_weight(v) for v in node.inputs[1:])


def _stacked_float_weight(node: ir.Node) -> bool:
    """A ``MatMul`` reading a constant float weight of rank ≥ 3 (stacked expert weights)."""
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    w = node.inputs[1].const_value
    return w is not None and w.dtype.is_floating_point() and len(w.shape) >= 3


def measure(model: ir.Model) -> Coverage:
    """Count quantized linears and list the float ones with their reasons (see module docstring)."""
    cov = Coverage()
    graph_outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        if is_quantized_linear(node):
            cov.quantized += 1
            continue
        if linear_weight(node) is None:
            if _stacked_float_weight(node):
                cov.kept_float.append(KeptFloat(node.name or "?", None, UNSUPPORTED))
            continue
        info = linear_info(node)
        role = info.key if info is not None else None
        reason = node.meta.get(KEPT_FLOAT_KEY) or node.metadata_props.get(KEPT_FLOAT_KEY)
        if reason is None:
            if info is not None and info.role == Role.ROUTER:
                cov.kept_float.append(KeptFloat(node.name or "?", role, ROUTER_CHOICE))
                continue
            head = (info is not None and info.role == Role.LM_HEAD) or (info is None and reaches_output(node, graph_outputs))
            tied = head and bool(linear_weight(node)[1])  # type: ignore[index]
            reason = LM_HEAD_TIED if tied else LM_HEAD_CHOICE if head else UNSUPPORTED
            role = "lm_head" if head else role
        cov.kept_float.append(KeptFloat(node.name or "?", role, reason))
    return cov


def model_type(folder: str | Path) -> str:
    """``config.json``'s ``model_type`` of a model folder ('unknown' when absent)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(cfg.get("model_type", "unknown")) if isinstance(cfg, dict) else "unknown"


def unsupported_message(family: str, names: list[str], what: str = "decoder linear(s) not quantized") -> str:
    first = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{family}: {len(names)} {what} (unsupported pattern): {first}; "
            "pass --allow-partial to write them in float, listed in quantization.json kept_float")


def enforce(cov: Coverage, family: str, allow_partial: bool) -> None:
    """Raise (exit 5) on an unsupported pattern unless ``allow_partial``; never accept a float model."""
    bad = cov.unsupported
    if bad and not allow_partial:
        raise UnsupportedModelError(unsupported_message(family, [k.node for k in bad]))
    if cov.quantized == 0:
        raise UnsupportedModelError(
            f"{family}: no linear was quantized ({len(cov.kept_float)} kept float); refusing to write a float model"
        )
    if bad:
        log.warning("%s: %d decoder linear(s) left in float (--allow-partial): %s", family, len(bad),
                    ", ".join(k.node for k in bad[:8]))
