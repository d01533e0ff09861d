"""Where the analysis looks: each linear's input/weight/output and each layer's residual stream.

All found from canonicalize's annotations, never from names:

* a *linear site* is an annotated linear ``Y = X·W`` with a constant, untransposed
  ``W[K, N]``: its input ``X``, output ``Y`` and weight initializer;
* the residual stream of decoder layer ``l`` is read at the inputs of its two RMSNorms
  (before any ``Cast``, so that the skip connection reads the same value):
  ``r_in(l)`` (un-normalized input of the norm feeding q/k/v) and ``r_mid(l)`` (of the
  norm feeding gate/up); the layer's output ``r_out(l)`` is ``r_in(l+1)``, or for the
  last layer the input of the final norm (the one feeding lm_head).  Decoder layer ``l``
  maps ``r_in(l) → r_out(l)`` and nothing else flows between layers, which is what lets
  :mod:`qcompiler.analysis.sessions` recompute one layer from cached ``r_in(l)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompiler.canonical import canonical_summary
from qcompiler.errors import UnsupportedModelError
from qcompiler.irutil import linear_weight
from qcompiler.spec import DECODER_ROLES, Role, linear_info

log = logging.getLogger(__name__)

_ATTN_IN = (Role.Q, Role.QKV)
_MLP_IN = (Role.GATE, Role.GATE_UP)


@dataclass
class LinearSite:
    """One quantizable linear: ``Y = X·W`` with ``W[K, N]`` an initializer."""

    key: str
    layer: int
    role: Role
    node: ir.Node
    input: str
    output: str
    weight: str
    k: int
    n: int

    @property
    def params(self) -> int:
        return self.k * self.n

    def weight_array(self) -> np.ndarray:
        return np.asarray(self.node.inputs[1].const_value.numpy(), dtype=np.float32)


@dataclass
class LayerSites:
    layer: int
    r_in: str | None = None
    r_mid: str | None = None
    r_out: str | None = None
    linears: dict[str, LinearSite] = field(default_factory=dict)  # key → site, graph order

    def by_role(self, *roles: Role) -> LinearSite | None:
        return next((s for s in self.linears.values() if s.role in roles), None)


@dataclass
class ModelSites:
    layers: list[LayerSites]
    linears: dict[str, LinearSite]  # every site, graph order
    float_bytes: int  # bytes of all initializers (the float model's weights)
    hidden: int
    graph_bytes: int = 0  # the graph itself (nodes, initializer headers): model.onnx without the weights

    def inputs(self) -> dict[str, list[str]]:
        """Distinct linear inputs → keys of the linears reading them."""
        out: dict[str, list[str]] = {}
        for s in self.linears.values():
            out.setdefault(s.input, []).append(s.key)
        return out

    def hidden_inputs(self) -> list[tuple[int, str]]:
        """(layer, value) of the inputs read by q/k/v and gate/up: the normalized hidden states."""
        found = []
        for ls in self.layers:
            for roles in (_ATTN_IN, _MLP_IN):
                s = ls.by_role(*roles)
                if s is not None:
                    found.append((ls.layer, s.input))
        return found

    def residuals(self) -> list[tuple[str, int, str]]:
        """(label, layer, value) of every residual-stream value found, in order."""
        out = []
        for ls in self.layers:
            if ls.r_in:
                out.append((f"layers.{ls.layer}.input", ls.layer, ls.r_in))
            if ls.r_mid:
                out.append((f"layers.{ls.layer}.mid", ls.layer, ls.r_mid))
        if self.layers and self.layers[-1].r_out:
            out.append(("final", len(self.layers), self.layers[-1].r_out))
        return out


def _through_casts(value: ir.Value) -> ir.Value:
    """The value before any ``Cast``/``Identity`` chain: the residual the norm and the skip both read."""
    node = value.producer()
    while node is not None and node.op_type in ("Cast", "Identity") and node.domain in ("", "ai.onnx"):
        value = node.inputs[0]
        node = value.producer()
    return value


def find_sites(model: ir.Model, lm_head: bool = False) -> ModelSites:
    """Linear sites and residual values of a (canonicalized, if not yet) decoder."""
    summary = canonical_summary(model)
    roles = set(DECODER_ROLES) | {Role.QKV, Role.GATE_UP} | ({Role.LM_HEAD} if lm_head else set())
    linears: dict[str, LinearSite] = {}
    for node in model.graph:
        info = linear_info(node)
        if info is None or info.role not in roles:
            continue
        found = linear_weight(node)
        if found is None or found[1] or node.op_type != "MatMul" or found[0].const_value is None:
            continue  # tied/transposed or Gemm weights stay float here, as in quantize-weights
        w = found[0]
        k, n = (int(d) for d in w.const_value.shape)
        linears[info.key] = LinearSite(info.key, info.layer, info.role, node, node.inputs[0].name,
                                       node.outputs[0].name, w.name, k, n)
    if not linears:
        raise UnsupportedModelError("no linear layer was recognized (canonicalize found no decoder layers)")
    layers = [LayerSites(i) for i in range(summary.num_layers)]
    for s in linears.values():
        if 0 <= s.layer < len(layers):
            layers[s.layer].linears[s.key] = s
    for ls in layers:
        for roles, attr in ((_ATTN_IN, "r_in"), (_MLP_IN, "r_mid")):
            site = ls.by_role(*roles)
            norm = summary.norms.get(site.key) if site is not None else None
            if norm is not None and not norm.fused:
                setattr(ls, attr, _through_casts(norm.input).name)
    final = summary.norms.get("lm_head")
    for i, ls in enumerate(layers):
        if i + 1 < len(layers):
            ls.r_out = layers[i + 1].r_in
        elif final is not None and not final.fused:
            ls.r_out = _through_casts(final.input).name
    if any(ls.r_in is None or ls.r_out is None for ls in layers):
        log.warning("analysis: the residual stream was not found around every decoder layer "
                    "(fused or unusual norms); those layers get linear-local sensitivities only")
    float_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    hidden = max((s.k for s in linears.values() if s.role in _ATTN_IN), default=0)
    return ModelSites(layers, linears, float_bytes, hidden, _graph_bytes(model))


def _graph_bytes(model: ir.Model) -> int:
    """Approximate bytes of ``model.onnx`` apart from weight data: nodes plus ~100 B per initializer entry."""
    return sum(ir.serde.serialize_node(n).ByteSize() for n in model.graph) + 100 * len(model.graph.initializers)
