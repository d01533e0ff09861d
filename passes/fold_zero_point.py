"""fold-zero-point: run static W8A8 on the raw quantized activation, the zero point folded into a bias.

With ``X̂ = s_x·(X_q − z_x)`` (static per tensor, ``X_q = QuantizeLinear(X, s_x, z_x)``) and
``Ŵ = s_w ⊙ W_q`` (symmetric int8 per output column)::

    Y = X̂·Ŵ = s_x·s_w ⊙ ((X_q − z_x·1)·W_q)
            = s_x·s_w ⊙ (X_q·W_q)  −  s_x·s_w ⊙ z_x·colsum(W_q)        colsum(W_q)[n] = Σ_k W_q[k, n]

The second term is a constant ``[N]`` vector: it becomes (with any following constant bias
``b``) the bias of an integer GEMM on the raw ``X_q``, so no zero point is subtracted per
element at run time::

    form=msft:  Y = com.microsoft.MatMulIntegerToFloat(X_q, W_q, s_x, s_w, bias = b − s_x·s_w·z_x·colsum)
    form=onnx:  Y = Add(Mul(Cast(MatMulInteger(X_q, W_q), float), s_x·s_w), b − s_x·s_w·z_x·colsum)

The weight is stored as :func:`qcompiler.quant.intgemm.encode_weight` says (``cpu_isa=any``:
``W_u = W_q + 128`` with zero point 128, so the GEMM is u8×u8 and exact on every CPU;
``(X_q)·(W_u − 128) = X_q·W_q``; ``cpu_isa=vnni``: int8 ``W_q``, u8×s8, which saturates on x86
CPUs without VNNI).  ``X_q·W_q`` is exact in int32 (|X_q·W_q| ≤ K·255·127 < 2³¹ for K < 66000), so the result
equals the unfolded QDQ graph up to float rounding of the scale product and the bias.
In an fp16/bf16 graph the integer sum, its scaling and the bias stay float32 (a sum of K
products of 8-bit values passes fp16's 65504) and the result is narrowed by one final Cast.
Symmetric activations (``z_x = 0``) are rewritten the same way (no bias term) unless
``symmetric=false``.  Per-token forms are left to the target lowering.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qcompiler.passes._lowering import base_name, following_bias, remove_dead, shared_u8_quantize, take_over

from qcompiler.floattype import float_type, graph_float_type
from qcompiler.irutil import MS_DOMAIN, add_initializer, ensure_opset, remove_unused_initializers
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.intgemm import check_cpu_isa, encode_weight
from qcompiler.quant.w8a8 import QUANT_KEY, W8A8Match, w8a8_matmuls

log = logging.getLogger(__name__)

_INT32_SAFE_K = (2**31 - 1) // (255 * 127)


@dataclass(frozen=True)
class FoldZeroPointConfig:
    form: str = "msft"  # msft: MatMulIntegerToFloat (ORT CPU/CUDA) | onnx: MatMulInteger + Cast + Mul + Add
    symmetric: bool = True  # also rewrite static forms whose zero point is 0
    fold_bias: bool = True  # fold a following constant bias Add into the GEMM's bias
    cpu_isa: str = "any"  # any: u8×u8 GEMMs, exact on every CPU | vnni: u8×s8 (VNNI/AMX/ARM CPUs only)

    def __post_init__(self) -> None:
        check_cpu_isa(self.cpu_isa)
        if self.form not in ("msft", "onnx"):
            raise ValueError(f"form must be msft or onnx, got {self.form}")


def folded_bias(w_q: np.ndarray, w_scale: np.ndarray, x_scale: float, x_zero: int,
                bias: np.ndarray | None = None) -> np.ndarray:
    """``b − s_x·s_w·z_x·colsum(W_q)`` in float32 (computed in float64)."""
    colsum = w_q.astype(np.int64).sum(axis=0).astype(np.float64)
    out = -float(x_scale) * w_scale.astype(np.float64) * float(x_zero) * colsum
    if bias is not None:
        out = out + bias.astype(np.float64)
    return out.astype(np.float32)


@register_pass
class FoldZeroPoint(QCPass):
    """Static W8A8 QDQ → integer GEMM on the raw activation with the zero point folded into a bias."""

    name = "fold-zero-point"
    Config = FoldZeroPointConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: FoldZeroPointConfig = self.config
        graph = model.graph
        counts: Counter[str] = Counter()
        for m in w8a8_matmuls(graph):
            if m.kind != "static":
                continue
            if m.x_zero == 0 and not cfg.symmetric:
                counts["symmetric left as QDQ"] += 1
                continue
            if m.w_q.shape[0] > _INT32_SAFE_K:
                counts["left as QDQ (K too large for int32)"] += 1
                continue
            self._fold(graph, m)
            counts["folded (zero point ≠ 0)" if m.x_zero else "rewritten (zero point 0)"] += 1
        done = sum(v for k, v in counts.items() if not k.startswith(("symmetric left", "left")))
        if done:
            remove_unused_initializers(graph)
            if cfg.form == "msft":
                ensure_opset(model, MS_DOMAIN, 1)
        self.context.report[self.name] = {"form": cfg.form, **counts}
        log.info("fold-zero-point: %s", ", ".join(f"{v} {k}" for k, v in counts.items()) or "no static W8A8 MatMul")
        return ir.passes.PassResult(model, modified=done > 0)

    def _fold(self, graph: ir.Graph, m: W8A8Match) -> None:
        cfg: FoldZeroPointConfig = self.config
        q = m.nodes[0]  # QuantizeLinear (pattern: Q, DQ, weight DQ, MatMul)
        base = base_name(m.matmul)
        y = m.matmul.outputs[0]
        ft = float_type(m.x, y, default=graph_float_type(graph))  # the graph's float type
        n = m.w_q.shape[1]
        x_q, x_zero = q.outputs[0], int(m.x_zero or 0)
        if m.x_zero_dtype == "int8" and cfg.cpu_isa == "any":
            # ORT has no int8 × uint8 kernel: quantize to uint8 with z + 128 instead, exactly
            # (clip(round(x/s) + z, −128, 127) + 128 = clip(round(x/s) + z + 128, 0, 255))
            x_zero += 128
            x_q = shared_u8_quantize(graph, q, x_zero, base).outputs[0]
        found = following_bias(y, n) if cfg.fold_bias else None
        bias = folded_bias(m.w_q, m.w_scale, m.x_scale, x_zero, found[0] if found else None)  # type: ignore[arg-type]
        has_bias = found is not None or x_zero != 0
        w_stored, w_zero = encode_weight(m.w_q, cfg.cpu_isa)
        w = add_initializer(graph, f"{base}_w_{w_stored.dtype}", ir.Tensor(w_stored))
        z_w = add_initializer(graph, f"{base}_w_zp", w_zero) if w_zero is not None else None
        if cfg.form == "msft":
            s_x = add_initializer(graph, f"{base}_x_scale", np.array(m.x_scale, np.float32))
            s_w = add_initializer(graph, f"{base}_w_scale", m.w_scale.astype(np.float32))
            inputs: list[ir.Value | None] = [x_q, w, s_x, s_w, None, z_w]
            if has_bias:
                inputs.append(add_initializer(graph, f"{base}_folded_bias", bias))
            while inputs[-1] is None:
                inputs.pop()
            new = [ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=f"{base}_MatMulIntegerToFloat")]
        else:
            mm_inputs: list[ir.Value | None] = [x_q, w] + ([None, z_w] if z_w is not None else [])
            mm = ir.node("MatMulInteger", mm_inputs, name=f"{base}_MatMulInteger")
            cast = ir.node("Cast", [mm.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
            scale = (np.float64(m.x_scale) * m.w_scale.astype(np.float64)).astype(np.float32)
            mul = ir.node("Mul", [cast.outputs[0], add_initializer(graph, f"{base}_xw_scale", scale)], name=f"{base}_Mul")
            new = [mm, cast, mul]
            if has_bias:
                new.append(ir.node("Add", [mul.outputs[0], add_initializer(graph, f"{base}_folded_bias", bias)],
                                   name=f"{base}_BiasAdd"))
        tagged = new[-1]
        if ft != ir.DataType.FLOAT:  # integer sums pass 65504: scale in float32, narrow once at the end
            new.append(ir.node("Cast", [new[-1].outputs[0]], {"to": ft}, name=f"{base}_out_Cast"))
        for node in new:
            node.meta.update(m.matmul.meta)
            node.metadata_props.update(m.matmul.metadata_props)
        tagged.metadata_props[QUANT_KEY] = "w8a8-static-folded"
        graph.insert_before(m.matmul, new)
        take_over(new[-1].outputs[0], found[1].outputs[0] if found else y)
        remove_dead(graph, [*m.nodes, *((found[1],) if found else ())])
