"""quantize-weights: round each annotated linear's weight onto an integer grid.

For ``Y = X·W`` with ``W[K, N]`` and spec (bits b, group g, sym/asym), each column is
cut into groups of g rows and each group gets its own scale ``s`` (and zero point z):

    asym:  s = (max − min)/(2^b − 1),  z = round(−min/s),  q = clamp(round(W/s) + z, 0, 2^b − 1)
    sym:   s = max|W|/(2^(b−1) − 1),   q = clamp(round(W/s), −2^(b−1), 2^(b−1) − 1)
    Ŵ = s·(q − z)  and  |W − Ŵ| ≤ s/2 inside the range.

``method`` picks how scales are chosen (``rtn``; others register in
``qcompiler.quant.methods``), ``clip=mse`` searches a per-group shrink of the range.
The result is written in the portable form ``MatMul(X, DequantizeLinear(q, s, z))``
(opset 21, see ``qcompiler.quant.emit``); a lowering pass turns it into the target's
kernel (``lower-matmulnbits`` for ONNX Runtime).  A spec already annotated on a node
(e.g. by ``assign-precision``) wins over the pass's defaults.  Weights are processed
one at a time straight from the memory-mapped external data.

A weight holding NaN/Inf is refused with an error naming it (``nonfinite=skip`` leaves
such linears in float with a warning instead): no NaN scale is ever written.  A
weight shared by several linears is quantized once per user (each gets the standard
form the lowerings read) and reported.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompiler.coverage import KEPT_FLOAT_KEY, mark_kept_float
from qcompiler.errors import InputError, QCError, UnsupportedModelError
from qcompiler.irutil import QUANT_OPSET, ensure_opset, linear_weight
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import emit_dequantized_weight, stored_spec
from qcompiler.quant.methods import get_weight_method
from qcompiler.spec import DECODER_ROLES, Granularity, QuantSpec, Role, linear_info, weight_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeWeightsConfig:
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    sym: bool = False
    method: str = "rtn"
    clip: str = "minmax"  # minmax | mse
    lm_head: bool = False  # also quantize an untied lm_head
    skip: str = ""  # ':'-separated linear keys to leave in float, e.g. layers.0.down_proj
    nonfinite: str = "error"  # a weight with NaN/Inf: error | skip (leave that linear in float)
    # a linear whose K is no multiple of group_size gets the largest power of two >= 32 below it that divides K
    # (MatMulNBits pads K to whole blocks: SmolLM2's K = 576 at g128 stores and reads 640 rows; g64 none)
    fit_k: bool = False
    # sym: all 2^b codes, each group's largest-magnitude value at -2^(b-1) through a signed scale (numerics)
    full_range: bool = False

    def __post_init__(self) -> None:
        if self.full_range and not self.sym:
            raise ValueError("full_range needs sym=true")
        if self.nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be error or skip, got {self.nonfinite}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size < 0 or (self.group_size and self.group_size & (self.group_size - 1)) or self.group_size == 1:
            raise ValueError(f"group_size must be 0 (per-channel) or a power of two >= 2, got {self.group_size}")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be minmax or mse, got {self.clip}")

    def spec(self) -> QuantSpec:
        gran = Granularity.GROUP if self.group_size else Granularity.CHANNEL
        return QuantSpec(
            bits=self.bits,
            symmetric=self.sym,
            granularity=gran,
            group_size=self.group_size or 128,
            method=self.method,
            clip=self.clip,
            full_range=self.full_range,
        )


def quantizable_linears(model: ir.Model, lm_head: bool = False, skip: frozenset[str] = frozenset()) -> list[ir.Node]:
    """Annotated linears with a float weight, in graph order."""
    roles = set(DECODER_ROLES) | {Role.QKV, Role.GATE_UP} | ({Role.LM_HEAD} if lm_head else set())
    out = []
    for node in model.graph:
        info = linear_info(node)
        if info is None or info.role not in roles:
            continue
        if info.key in skip:
            mark_kept_float(node, "user exclusion (skip)")
            continue
        found = linear_weight(node)
        if found is None:
            continue
        _, transposed = found
        if transposed:
            log.info("quantize-weights: %s has a tied (transposed) weight; left in float", info.key)
            mark_kept_float(node, "tied to the embedding (quantize-embeddings quantizes both)")
            continue
        out.append(node)
    return out


@register_pass
class QuantizeWeights(QCPass):
    """Weight-only quantization of the decoder's linears (see module docstring)."""

    name = "quantize-weights"
    Config = QuantizeWeightsConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: QuantizeWeightsConfig = self.config
        method = get_weight_method(cfg.method)
        nodes = quantizable_linears(model, cfg.lm_head, frozenset(filter(None, cfg.skip.split(":"))))
        if not nodes:
            any_matmul = any(n.op_type in ("MatMul", "Gemm") for n in model.graph)
            if not any_matmul:
                raise UnsupportedModelError("the model has no MatMul/Gemm: nothing to quantize")
            raise UnsupportedModelError(
                "no linear layer was recognized (canonicalize found no decoder layers); nothing to quantize"
            )
        self._targets = nodes  # for ensures: each is quantized or deliberately kept in float
        default = cfg.spec()
        summary: dict[str, str] = {}
        _report_shared(nodes, self.context.report)
        def spec_of(n: ir.Node) -> QuantSpec:  # the node's spec, its scales in the type the graph stores them
            spec = weight_spec(n)
            if spec is None:
                spec = _fit_k(default, linear_weight(n)[0].shape[0]) if cfg.fit_k else default  # type: ignore[index]
            return stored_spec(spec, model.graph, n)

        ahead = _rounded_ahead(nodes, spec_of, method) if cfg.method in RANGE_CHECKED else None
        for node in tqdm(nodes, desc="quantize-weights", unit="linear", leave=False):
            info = linear_info(node)
            spec = spec_of(node)
            w_val, _ = linear_weight(node)  # type: ignore[misc]
            # RTN: NaN/Inf shows in the group ranges (an error), so W gets no pass of its own for it
            qw, error = next(ahead) if ahead is not None else (None, None)
            w = w_val.const_value.numpy()
            if error is not None and _nonfinite(w) == "":
                raise QCError(f"quantize-weights: {info.key}: {error}") from None
            bad = "" if qw is not None else _nonfinite(w)
            if bad:
                msg = f"weight '{w_val.name}' of {info.key} holds {bad}"
                if cfg.nonfinite == "error":
                    raise InputError(
                        f"quantize-weights: {msg}; refusing to quantize it "
                        "(pass option quantize-weights{nonfinite=skip} leaves such linears in float)"
                    )
                log.warning("quantize-weights: %s; left in float (nonfinite=skip)", msg)
                mark_kept_float(node, "NaN/Inf weight (nonfinite=skip)")
                self.context.report.setdefault("nonfinite_weights", {})[info.key] = msg
                continue
            if qw is None:
                try:
                    qw = method(w, spec, node=node, context=self.context)
                except ValueError as e:
                    raise QCError(f"quantize-weights: {info.key}: {e}") from None
            emit_dequantized_weight(model.graph, node, qw, base_name=f"{info.key}.weight")
            summary[info.key] = spec.describe()
            del w
        if not summary:
            raise InputError("quantize-weights: every weight holds NaN/Inf values; nothing was quantized")
        ensure_opset(model, "", QUANT_OPSET)
        self.context.report.setdefault("weights", {}).update(summary)
        log.info("quantize-weights: %d linears quantized (%s)", len(summary), default.describe())
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        """Coverage: every linear the pass took on now reads a DequantizeLinear weight, or says why it is float."""
        missed = [linear_info(n).key for n in getattr(self, "_targets", [])  # type: ignore[union-attr]
                  if KEPT_FLOAT_KEY not in n.meta and not _reads_dq(n)]
        if missed:
            raise ir.passes.PostconditionError(
                f"{len(missed)} linear(s) neither quantized nor kept float with a reason: {', '.join(missed[:5])}")


def _fit_k(spec: QuantSpec, k: int | None) -> QuantSpec:
    """``spec`` with the largest group ``g`` (a power of two, 32 <= g <= the spec's) dividing ``k``; as is when
    none does, for per-channel specs, or when the group already divides ``k``."""
    if spec.granularity != Granularity.GROUP or not isinstance(k, int) or k % spec.group_size == 0:
        return spec
    g = spec.group_size // 2
    while g >= 32 and k % g:
        g //= 2
    return dataclasses.replace(spec, group_size=g) if g >= 32 else spec


def _reads_dq(node: ir.Node) -> bool:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    p = w.producer() if w is not None else None
    return p is not None and p.op_type == "DequantizeLinear" and p.domain == ""


def _rounded_ahead(nodes: list[ir.Node], spec_of: Callable[[ir.Node], QuantSpec], method: object,
                   depth: int = 2) -> Iterator[tuple[object | None, ValueError | None]]:
    """``(QuantizedWeight, None)`` or ``(None, error)`` per node, in order, computed ``depth`` weights ahead
    on worker threads while the caller writes the previous ones into the graph (numpy releases the GIL in
    the rounding; the graph is only touched by the caller).  For context-free methods (RTN)."""

    def work(w: np.ndarray, spec: QuantSpec, node: ir.Node) -> tuple[object | None, ValueError | None]:
        try:
            return method(w, spec, node=node), None  # type: ignore[operator]
        except ValueError as e:
            return None, e

    def submit(pool: ThreadPoolExecutor, node: ir.Node) -> Future:
        w_val, _ = linear_weight(node)  # type: ignore[misc]
        w = w_val.const_value.numpy()  # mapped here: onnx_ir's lazy loading is not for several threads
        return pool.submit(work, w, spec_of(node), node)

    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="quantize-weights") as pool:
        pending = [submit(pool, n) for n in nodes[:depth]]
        for i in range(len(nodes)):
            result = pending[i].result()
            pending[i] = None  # type: ignore[call-overload]  # (its arrays go once the caller is done)
            if i + depth < len(nodes):
                pending.append(submit(pool, nodes[i + depth]))
            yield result


#: methods whose scales come from per-group min/max (``scales_from_range`` refuses a non-finite range):
#: a weight holding NaN/Inf fails inside them, so it is looked for only then
RANGE_CHECKED = frozenset({"rtn"})


def _nonfinite(w: np.ndarray) -> str:
    """'' if every value is finite, else e.g. ``"2 NaN/Inf value(s), the first at [3, 4]"``."""
    finite = np.isfinite(w)
    if finite.all():
        return ""
    where = np.argwhere(~finite)
    return f"{len(where)} NaN/Inf value(s), the first at {list(map(int, where[0]))}"


def _report_shared(nodes: list[ir.Node], report: dict) -> None:
    """Log (and report) weights that several linears read: each user gets its own copy."""
    users: dict[int, tuple[ir.Value, list[str]]] = {}
    for node in nodes:
        w_val, _ = linear_weight(node)  # type: ignore[misc]
        users.setdefault(id(w_val), (w_val, []))[1].append(linear_info(node).key)  # type: ignore[union-attr]
    shared = {v.name or "?": keys for v, keys in users.values() if len(keys) > 1}
    for name, keys in shared.items():
        log.warning("quantize-weights: weight '%s' is shared by %s; quantized once per user", name, ", ".join(keys))
    if shared:
        report.setdefault("shared_weights", {}).update(shared)
