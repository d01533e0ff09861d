"""lower-matmulnbits: ``MatMul(X, DequantizeLinear(q, s, z))`` → ``com.microsoft.MatMulNBits``.

Same numbers, ONNX Runtime's fused kernel: ``Y = X·Ŵ`` with ``Ŵ = s·(q − z)`` blocked
along K.  The weight is re-packed column-major (``qcompiler.quant.packing``):
``B[N, ceil(K/B), B/2]`` nibbles, ``scales[N·nb]``, packed ``zero_points``; symmetric
int4 becomes ``q + 8`` with the implicit zero point 8.  Per-channel weights use one
block of the next power of two ≥ K (K padded).  MatMulNBits takes ``X[..., K]`` of any
rank; a bias Add is left as it is.  ``scales`` keep the DequantizeLinear scale's float type
(MatMulNBits' ``T1``: A, scales and Y share it; fp16 on CPU and CUDA, bf16 on CUDA).  ``accuracy_level`` (0–4) lets ONNX Runtime compute
with int8 activations (4) for speed; the default 0 keeps float accuracy.
Nodes that don't match exactly (3-bit, other axes, a DQ shared with other users)
are left alone and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

from qcompiler.floattype import float_array
from qcompiler.irutil import MS_DOMAIN, add_initializer, ensure_opset, remove_unused_initializers
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.packing import matmulnbits_block_size, pack_matmulnbits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowerMatMulNBitsConfig:
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")


@register_pass
class LowerMatMulNBits(QCPass):
    """Rewrite block/channel-dequantized weights feeding MatMul into MatMulNBits."""

    name = "lower-matmulnbits"
    Config = LowerMatMulNBitsConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        self._left: dict[int, str] = {}  # MatMul → why it keeps its weight DequantizeLinear (for ensures)
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            w = node.inputs[1]
            dqw = read_dq_weight(w) if w is not None else None
            if dqw is None:
                if _weight_dq(node) is not None:
                    self._left[id(node)] = "not a block/channel weight form this pass reads"
                continue
            if dqw.bits not in (4, 8):
                log.info("lower-matmulnbits: %s has %d-bit weights; left as DequantizeLinear", node.name, dqw.bits)
                self._left[id(node)] = f"{dqw.bits}-bit"
                continue
            if len(w.consumers()) != 1:
                log.info("lower-matmulnbits: weight of %s is shared; left as DequantizeLinear", node.name)
                self._left[id(node)] = "shared weight"
                continue
            k, n = dqw.q.shape
            block = matmulnbits_block_size(dqw.group_size, k)
            packed, scales, zps = pack_matmulnbits(dqw.q, dqw.scale, dqw.zero_point, dqw.bits, block, dqw.group_size)
            base = dqw.dq.name.removesuffix("_DequantizeLinear") if dqw.dq.name else "w"
            inputs = [
                node.inputs[0],
                add_initializer(graph, f"{base}_nbits", packed),
                add_initializer(graph, f"{base}_nbits_scales", float_array(scales, dqw.scale_type)),
            ]
            if zps is not None:
                inputs.append(add_initializer(graph, f"{base}_nbits_zp", zps))
            new = ir.node(
                "MatMulNBits",
                inputs,
                attributes={
                    "K": k,
                    "N": n,
                    "bits": dqw.bits,
                    "block_size": block,
                    "accuracy_level": self.config.accuracy_level,
                },
                domain=MS_DOMAIN,
                name=(node.name or base) + "_nbits",
            )
            new.meta.update(node.meta)
            new.metadata_props.update(node.metadata_props)
            graph.insert_before(node, new)
            node.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            old_out = node.outputs[0]
            name, old_out.name = old_out.name, None
            new.outputs[0].name = name
            new.outputs[0].shape, new.outputs[0].type = old_out.shape, old_out.type
            graph.remove([node, dqw.dq], safe=True)
            count += 1
        if count:
            remove_unused_initializers(graph)
            ensure_opset(model, MS_DOMAIN, 1)
        log.info("lower-matmulnbits: %d MatMul(s) → MatMulNBits", count)
        return ir.passes.PassResult(model, modified=count > 0)

    def ensures(self, model: ir.Model) -> None:
        """No weight-only QDQ left behind: every MatMul still reading a constant-weight DequantizeLinear
        is one the pass logged why it left (3-bit, shared, a form it does not read)."""
        left = getattr(self, "_left", {})
        stray = [n.name or "?" for n in model.graph
                 if n.op_type == "MatMul" and n.domain == "" and id(n) not in left and _weight_dq(n) is not None]
        if stray:
            raise ir.passes.PostconditionError(
                f"{len(stray)} MatMul(s) still read a quantized weight through DequantizeLinear: {', '.join(stray[:5])}")


def _weight_dq(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear of a constant integer weight feeding ``node`` (structure only: no data read)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    dq = w.producer() if w is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    q = dq.inputs[0]
    if q is None or q.const_value is None or q.dtype not in _INT_WEIGHTS:
        return None
    return dq


_INT_WEIGHTS = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8,
                          ir.DataType.INT2, ir.DataType.UINT2})
