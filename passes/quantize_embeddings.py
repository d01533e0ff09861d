"""quantize-embeddings: the token embedding and the lm_head to int4/int8 blocks, one tensor when tied.

The embedding ``E[V, H]`` is read two ways: ``Gather(E, ids)`` (row lookup) and, when the
lm_head is tied, ``logits = x·Eᵀ`` (``MatMul(x, Transpose(E))``).  As the lm_head's weight
``W = Eᵀ[K=H, N=V]``, group-wise quantization along K cuts each *row* of E into blocks
of g along H, ``Ê[v, h] = s[v, h//g]·(q[v, h] − z[v, h//g])`` — which is also exactly
what a row lookup needs.  So one quantized tensor serves both uses::

    q[V, H] (int4/uint4/int8/uint8), s[V, ⌈H/g⌉], z ─ DequantizeLinear(axis=1, block_size=g) ─ Ê
    Gather(Ê, ids)        MatMul(x, Transpose(Ê))

(per-channel: ``axis=0``, one scale per vocabulary row).  This is the portable form;
``lower-embeddings`` turns it into ``GatherBlockQuantized`` + ``MatMulNBits`` sharing the
packed bytes.  The scales are picked by a data-free method of the weight-method registry
(``rtn``, ``hqq``; ``clip=mse``) applied to ``W = Eᵀ``.  An untied lm_head is quantized
on its own (``lm_head=true``, the default) in the usual ``DequantizeLinear`` + MatMul form.

``method=gptq`` (needs ``--calib``) is output-aware for the lm_head: with ``x`` the lm_head's
input (the final norm's output, from the model as it is now, i.e. after the decoder's own
quantization) and ``H = Σ xᵀx`` over the calibration windows, GPTQ
(:mod:`qcompiler.quant.gptq`) minimizes ``‖x·(W − Ŵ)‖²`` = the logits' error instead of
``‖W − Ŵ‖²``: one quadratic form per vocabulary column, all sharing ``H[H, H]``; static groups
(act-order), so the scales are RTN's and only the codes differ.  A tied table is either kept as
one tensor whose GPTQ codes the row lookup reads too (``share=true``; GPTQ does not weigh the
lookup's error) or split in two (``share=false``): the lookup keeps data-free codes, the lm_head
gets its own GPTQ-coded tensor (``lm_head.weight_*``, lowered to its own MatMulNBits).  On
SmolLM2-135M (hidden states of the w4a16-rtn g128 body, git's release notes, ``H`` from the
GPL-3): perplexity with the fp32 head 54.86, int4 RTN g128 66.56, GPTQ g128 57.05, GPTQ g32
55.41 (docs/fusion.md, recipe ``w4a16-fast``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir
from qcompiler.passes.canonicalize import canonical_summary
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig

from qcompiler.calibrate import StatRequest, fewer_windows
from qcompiler.errors import QCError
from qcompiler.floattype import float_array, float_type, type_name
from qcompiler.irutil import QUANT_OPSET, add_initializer, ensure_opset, is_weight, linear_weight, topo_index
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import QWEIGHT_KEY, WeightDQ, emit_dequantized_weight
from qcompiler.quant.gptq import gptq_quantize
from qcompiler.quant.methods import get_weight_method
from qcompiler.quant.numerics import QuantizedWeight
from qcompiler.spec import QuantSpec, set_weight_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeEmbeddingsConfig:
    bits: int = 4
    group_size: int = 128  # 0 = per vocabulary row
    sym: bool = False
    method: str = "rtn"  # a data-free weight method (rtn | hqq) or gptq (calibrated on the lm_head's input)
    clip: str = "minmax"  # minmax | mse
    lm_head: bool = True  # also an untied lm_head
    damp: float = 0.01  # gptq: λ = damp·mean diag H
    # gptq, tied table: one tensor (the lookup reads the GPTQ codes too) or two, the lookup keeping data-free codes
    share: bool = True
    samples: int = 16  # gptq: at most this many calibration windows (SmolLM2: 8k tokens are plenty for H[576, 576])
    full_range: bool = False  # sym: all 2^b codes through a signed scale (qcompiler.quant.numerics)

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")

    def spec(self) -> QuantSpec:
        method = "rtn" if self.method == "gptq" else self.method  # the grid; gptq picks the codes
        return replace(QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size, sym=self.sym,
                                             method=method, clip=self.clip, full_range=self.full_range).spec(),
                       method=self.method)


def embedding_gathers(model: ir.Model) -> dict[str, list[ir.Node]]:
    """``{embedding initializer name: [Gather nodes reading rows of it]}`` (float 2-D data, axis 0)."""
    found: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
            continue
        data, ids = node.inputs[0], node.inputs[1]
        if is_weight(data) and ids is not None and ids.const_value is None:
            found.setdefault(data.name, []).append(node)
    return found


def _int_dtype(bits: int, symmetric: bool) -> ir.DataType:
    if bits <= 4:
        return ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if symmetric else ir.DataType.UINT8


def emit_row_blocks(graph: ir.Graph, qw: QuantizedWeight, base: str,
                    ftype: ir.DataType = ir.DataType.FLOAT) -> ir.Node:
    """``DequantizeLinear`` of ``Ŵᵀ[V, H]`` (``qw`` quantizes ``W = Eᵀ[H, V]``) blocked along H;
    scales and output in ``ftype`` (the table's float type)."""
    spec = qw.spec
    h, v = qw.q.shape
    dtype = _int_dtype(spec.bits, spec.symmetric)
    q = np.ascontiguousarray(qw.q.T).astype(np.int8 if spec.symmetric else np.uint8)
    inputs = [add_initializer(graph, f"{base}_q{spec.bits}", ir.Tensor(q, dtype=dtype))]
    per_row = qw.group_size >= h
    if per_row:
        attrs = {"axis": 0}
        inputs.append(add_initializer(graph, f"{base}_scale", float_array(qw.scale.reshape(v), ftype)))
        zp = None if qw.zero_point is None else qw.zero_point.reshape(v)
    else:
        attrs = {"axis": 1, "block_size": qw.group_size}
        inputs.append(add_initializer(graph, f"{base}_scale", float_array(qw.scale.T, ftype)))
        zp = None if qw.zero_point is None else np.ascontiguousarray(qw.zero_point.T)
    if zp is not None:
        inputs.append(add_initializer(graph, f"{base}_zp", ir.Tensor(zp.astype(np.uint8), dtype=dtype)))
    dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{base}_DequantizeLinear",
                 outputs=[ir.Value(name=f"{base}_dq", shape=ir.Shape([v, h]), type=ir.TensorType(ftype))])
    dq.meta[QWEIGHT_KEY] = WeightDQ(spec, qw.group_size, h, v)
    return dq


#: vocabulary rows quantized at a time: bounds the temporaries to a slice of the table
COLUMN_CHUNK = 4096


def quantize_by_columns(method, table: np.ndarray, spec: QuantSpec, chunk: int = COLUMN_CHUNK) -> QuantizedWeight:
    """Quantize ``W = tableᵀ`` ([H, V]) ``chunk`` columns (vocabulary rows) at a time.

    ``table`` is the embedding [V, H]; for an untied lm_head weight ``W`` pass the view ``W.T``.

    Groups run along K = H, so every column is quantized on its own (RTN, HQQ, MSE clipping):
    the result equals quantizing W at once, while the float32 copies and the methods'
    temporaries cover one slice of a table that is often the largest tensor of a small
    model (SmolLM2-135M: 49152 × 576; the pass peaked at 1057 MiB at once, 496 MiB in chunks).
    """
    parts = []
    for j in range(0, table.shape[0], chunk):
        w = np.ascontiguousarray(np.asarray(table[j : j + chunk], dtype=np.float32).T)
        parts.append(method(w, spec))
        del w
    if len(parts) == 1:
        return parts[0]
    zps = [p.zero_point for p in parts]
    return QuantizedWeight(
        q=np.concatenate([p.q for p in parts], axis=1),
        scale=np.concatenate([p.scale for p in parts], axis=1),
        zero_point=None if zps[0] is None else np.concatenate(zps, axis=1),
        spec=parts[0].spec,
        group_size=parts[0].group_size,
    )


@register_pass
class QuantizeEmbeddings(QCPass):
    """Token embedding (+ lm_head, sharing one tensor when tied) to int4/int8 blocks."""

    name = "quantize-embeddings"
    Config = QuantizeEmbeddingsConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: QuantizeEmbeddingsConfig = self.config
        graph = model.graph
        spec = cfg.spec()
        lm = canonical_summary(model).linears.get("lm_head")
        lm_found = linear_weight(lm) if lm is not None else None
        data_free = get_weight_method("rtn" if cfg.method == "gptq" else cfg.method)
        xtx = self._lm_head_hessian(model, lm) if cfg.method == "gptq" and lm is not None else None
        self._errors: dict[str, float] = {}

        def method_for(table_is_lm_head: bool) -> Callable[..., QuantizedWeight]:
            """GPTQ for a table the lm_head reads; a lone embedding has no output to weigh: data-free."""
            return self._gptq(xtx) if table_is_lm_head and xtx is not None else data_free

        done: dict[str, str] = {}
        for name, gathers in embedding_gathers(model).items():
            e_val = graph.initializers[name]
            tied = lm_found is not None and lm_found[0] is e_val and lm_found[1]
            others = [u for u in e_val.consumers() if u not in gathers]
            transposes = [u for u in others if u.op_type == "Transpose" and list(u.attributes.get_ints("perm", [1, 0]))
                          == [1, 0]]
            if len(transposes) != len(others):
                log.warning("quantize-embeddings: %s has other users (%s); left in float", name,
                            ", ".join(sorted({u.op_type for u in others})))
                continue
            split = bool(tied) and not cfg.share and xtx is not None  # the lookup keeps data-free codes
            groups = [(method_for(bool(tied) and not split), name, (*gathers, *([] if split else transposes)))]
            if split:
                groups.append((method_for(True), "lm_head.weight", tuple(transposes)))
            order = topo_index(graph)
            for method, base, users in groups:
                try:
                    stored = replace(spec, scale_dtype=type_name(float_type(e_val)))  # codes for the stored scales
                    qw = quantize_by_columns(method, e_val.const_value.numpy(), stored)
                except ValueError as e:
                    raise QCError(f"quantize-embeddings: {name}: {e}") from None
                dq = emit_row_blocks(graph, qw, base, float_type(e_val))
                graph.insert_before(min(users, key=lambda n: order[id(n)]), dq)
                for node in users:
                    node.replace_input_with(0, dq.outputs[0])
            del graph.initializers[name]
            done[name] = f"{spec.describe()} ({'tied: embedding + lm_head' if tied and not split else 'embedding'})"
            if tied and lm is not None:
                set_weight_spec(lm, spec)
                done["lm_head"] = f"{spec.describe()} ({'own codes, untied from' if split else 'shares'} {name})"
        if cfg.lm_head and lm is not None and lm_found is not None and not lm_found[1] and "lm_head" not in done:
            w_val = lm_found[0]
            qw = quantize_by_columns(method_for(True), w_val.const_value.numpy().T, spec)  # W [H, V] = (Wᵀ)ᵀ
            emit_dequantized_weight(graph, lm, qw, base_name="lm_head.weight")
            done["lm_head"] = spec.describe()
        if not done:
            log.warning("quantize-embeddings: no token embedding or lm_head found; nothing quantized")
            return ir.passes.PassResult(model, modified=False)
        ensure_opset(model, "", QUANT_OPSET)
        if self._errors:
            e = self._errors
            done["lm_head_output_error"] = {"gptq": e["gptq"] / e["norm"], "rtn": e["rtn"] / e["norm"]}  # type: ignore[assignment]
        self.context.report.setdefault("embeddings", {}).update(done)
        log.info("quantize-embeddings: %s", "; ".join(f"{k}: {v}" for k, v in done.items()))
        return ir.passes.PassResult(model, modified=True)

    def _lm_head_hessian(self, model: ir.Model, lm: ir.Node) -> np.ndarray:
        """``Σ xᵀx`` of the lm_head's input on the calibration windows (the model as it is now)."""
        calibrate = fewer_windows(self.context.require_calibration(f"{self.name} (method=gptq)"), self.config.samples)
        x = lm.inputs[0]
        assert x is not None
        stats = calibrate(model, [StatRequest(x.name, ("hessian",))])
        return np.asarray(stats.get(x.name, "hessian").xtx, dtype=np.float64)

    def _gptq(self, xtx: np.ndarray) -> Callable[..., QuantizedWeight]:
        """A weight method: GPTQ of (column slices of) ``W[H, V]`` with the lm_head input's ``H``; sums the
        logit error ``tr(ΔᵀHΔ)`` of GPTQ and of RTN on the same grid, and ``tr(WᵀHW)``, for the report."""
        damp = self.config.damp
        rtn = get_weight_method("rtn")
        h32 = xtx.astype(np.float32)

        def quadratic(d: np.ndarray) -> float:
            return float(np.sum(d * (h32 @ d), dtype=np.float64))

        def method(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
            qw = gptq_quantize(w, xtx, spec, damp=damp, clip=spec.clip)
            for key, err in (("gptq", w - qw.dequantize()), ("rtn", w - rtn(w, spec).dequantize()), ("norm", w)):
                self._errors[key] = self._errors.get(key, 0.0) + quadratic(err)
            return qw

        return method
