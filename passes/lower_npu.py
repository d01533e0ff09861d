"""lower-npu: the portable form made NPU-ready — opset-21 QDQ, standard ops, symmetric weights, static shapes.

NPU compilers take plain QDQ graphs: ``DequantizeLinear(W_q, s)`` weights with a zero
point of 0.  A weight that is not symmetric int8 per channel or symmetric int4 (per
channel or block) is re-quantized from its dequantized values::

    Ŵ = s·(q − z)   →   s' = c·max|Ŵ|/q_max (per channel for int8, per block for int4),
                        q' = clip(round(Ŵ/s'), −q_max, q_max)

with ``c = 1`` for int8 (at most ``s'/2`` error per weight) and ``c`` from an MSE search
for int4 (rounding twice onto 15 levels hurts: quantize with ``--sym`` for the npu
target instead, which the pass says when it has to re-quantize).  Conforming weights
are left untouched.

ONNX Runtime, when it runs this graph on a CPU, fuses ``DQ(uint8 X)·DQ(int8 W)`` into its
u8×s8 GEMM, which saturates on x86 CPUs without VNNI unless ``|q| ≤ 64``
(``qcompiler.quant.intgemm``).  With ``cpu_isa=any`` (default) the weights of such W8A8
MatMuls must therefore lie in ``[−64, 63]``: the recipes quantize them to 7 bits directly
(``insert-qdq{weight_bits=7}``, still int8 symmetric per channel, the format NPU compilers
take); a wider one met here is re-quantized to ``[−63, 63]`` from its dequantized values
with a warning.  ``cpu_isa=vnni`` keeps full-range int8 weights (for an NPU, or VNNI CPUs).
``static_shapes=T`` fixes batch = 1 and every sequence dimension of
the (KV-cache-free) graph inputs to ``T``, then infers shapes and folds the shape
arithmetic that became constant (Shape/Gather/Concat/... chains, never a Q/DQ or a
weight).  The result must hold only default-domain ops at opset 21 and pass
``onnx.checker.check_model(full_check=True)``, which the pass runs on a temporary copy
(models above 2 GiB of weights are left to ``qc check MODEL_DIR --target npu``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError, UnsupportedModelError
from qcompiler.floattype import FLOAT_TYPES, float_array, float_type, type_name
from qcompiler.irutil import (
    QUANT_OPSET,
    add_initializer,
    default_opset,
    ensure_opset,
    remove_unused_initializers,
)
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.intgemm import SAFE_S8, check_cpu_isa
from qcompiler.quant.numerics import dequantize, quantize_weight
from qcompiler.spec import Granularity, QuantSpec

log = logging.getLogger(__name__)

_BATCH = re.compile(r"batch", re.IGNORECASE)
_SEQ = re.compile(r"seq|total|length|tokens", re.IGNORECASE)
#: shape arithmetic that may be folded once shapes are static (small int tensors only)
_SHAPE_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Range", "Reshape",
              "Add", "Sub", "Mul", "Div", "Equal", "Less", "Greater", "Where", "ConstantOfShape", "Expand",
              "Neg", "Min", "Max", "Not", "And", "Or", "Identity", "Constant", "ReduceProd", "CumSum", "Trilu"}
_CHECK_MAX_BYTES = 2 << 30  # above this the check is left to 'qc check'


@dataclass(frozen=True)
class LowerNpuConfig:
    static_shapes: int | None = None  # sequence length to fix (None: keep dynamic shapes)
    batch: int = 1
    requantize: bool = True  # re-quantize non-conforming weights (else: error)
    check: bool = True  # run onnx.checker full_check (on a temporary copy)
    cpu_isa: str = "any"  # any: W8A8 weights in [-64, 63] so ORT's fused CPU GEMMs are exact | vnni: full int8

    def __post_init__(self) -> None:
        check_cpu_isa(self.cpu_isa)
        if self.static_shapes is not None and self.static_shapes < 1:
            raise ValueError(f"static_shapes must be a positive sequence length, got {self.static_shapes}")


@register_pass
class LowerNpu(QCPass):
    """Make the portable QDQ form NPU-ready: standard ops, opset 21, symmetric weights, static shapes."""

    name = "lower-npu"
    Config = LowerNpuConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        foreign = Counter(f"{n.domain}.{n.op_type}" for n in graph.all_nodes() if n.domain not in ("", "ai.onnx"))
        if foreign:
            listed = ", ".join(f"{k} ×{v}" for k, v in sorted(foreign.items()))
            raise UnsupportedModelError(
                f"lower-npu: the graph has ops outside the standard ONNX domain ({listed}); the npu target "
                "needs the portable QDQ form: quantize with --target npu (no lower-matmulnbits/lower-qc-ops)"
            )
        opset = default_opset(model)
        if opset > QUANT_OPSET:
            raise UnsupportedModelError(f"lower-npu: default opset {opset} is above {QUANT_OPSET}; "
                                        f"re-export with opset <= {QUANT_OPSET}")
        report: dict[str, object] = {}
        counts = self._weights(graph)
        report["weights"] = dict(counts)
        narrowed = sum(v for k, v in counts.items() if "[-63, 63]" in k)
        if narrowed:
            log.warning("lower-npu: narrowed %d W8A8 weight(s) to [-63, 63] from their dequantized values so that "
                        "ONNX Runtime's fused u8×s8 CPU GEMMs are exact on every CPU (rounding twice); quantize "
                        "with --target npu to get 7-bit weights directly, or --cpu-isa vnni to keep 8 bits", narrowed)
        redone = sum(v for k, v in counts.items() if "→" in k) - narrowed
        if redone:
            log.warning("lower-npu: re-quantized %d weight(s) to symmetric int8/int4 from their dequantized values, "
                        "which compounds rounding error; quantize with --sym (int4) or --bits 8 --group-size 0 "
                        "for the npu target", redone)
        if self.config.static_shapes is not None:
            report["static_shapes"] = self._static_shapes(model)
        ensure_opset(model, "", QUANT_OPSET)
        remove_unused_initializers(graph)
        for name in [d for d in model.opset_imports if d not in ("", "ai.onnx")]:
            del model.opset_imports[name]
        if self.config.check:
            report["checker"] = _check(model)
        self.context.report[self.name] = report
        log.info("lower-npu: %s", report)
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------------ weights

    def _weights(self, graph: ir.Graph) -> Counter[str]:
        counts: Counter[str] = Counter()
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain != "":
                continue
            dqw = read_dq_weight(node.outputs[0])  # a constant 2-D weight (channel or block), else None
            if dqw is None:
                continue
            per_channel = dqw.group_size >= dqw.q.shape[0]
            sd = type_name(node.inputs[1].dtype) if node.inputs[1].dtype in FLOAT_TYPES else "fp32"  # stored scales
            ok = dqw.symmetric and dqw.zero_point is None and (dqw.bits == 4 or (dqw.bits == 8 and per_channel))
            narrow = self.config.cpu_isa == "any" and dqw.bits == 8 and _feeds_qdq_matmul(node)
            if ok and narrow and (int(dqw.q.min()) < SAFE_S8[0] or int(dqw.q.max()) > SAFE_S8[1]):
                w = dequantize(dqw.q, dqw.scale, dqw.zero_point, dqw.group_size)
                spec7 = QuantSpec(bits=7, symmetric=True, granularity=Granularity.CHANNEL, method="rtn",
                                  scale_dtype=sd)
                qw = quantize_weight(w, spec7)
                self._replace_weight(graph, dqw.dq, qw.q, qw.scale, 8, 0)
                counts["int8 channel → int8 in [-63, 63] (W8A8: exact on every CPU)"] += 1
                continue
            if ok:
                counts[f"int{dqw.bits} {'channel' if per_channel else 'block'} kept"] += 1
                continue
            if not self.config.requantize:
                raise QCError(f"lower-npu: weight {node.inputs[0].name} is not symmetric int8 per-channel / int4; "
                              "pass requantize=true or quantize with --sym")
            w = dequantize(dqw.q, dqw.scale, dqw.zero_point, dqw.group_size)
            bits = 8 if dqw.bits == 8 else 4
            group = dqw.group_size if (bits == 4 and not per_channel) else 0
            spec = QuantSpec(bits=bits, symmetric=True, granularity=Granularity.GROUP if group else Granularity.CHANNEL,
                             group_size=group or 128, method="rtn", clip="mse" if bits == 4 else "minmax",
                             scale_dtype=sd)
            qw = quantize_weight(w, spec)
            self._replace_weight(graph, dqw.dq, qw.q, qw.scale, bits, group)
            counts[f"int{dqw.bits} {'asym' if not dqw.symmetric else 'sym'} "
                   f"{'channel' if per_channel else 'block'} → int{bits} sym {'block' if group else 'channel'}"] += 1
        return counts

    @staticmethod
    def _replace_weight(graph: ir.Graph, old_dq: ir.Node, q: np.ndarray, scale: np.ndarray, bits: int,
                        group: int) -> None:
        base = (old_dq.name or "w").removesuffix("_DequantizeLinear")
        dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
        qv = add_initializer(graph, f"{base}_npu_q{bits}", ir.Tensor(q.astype(np.int8), dtype=dtype))
        ft = float_type(old_dq.inputs[1], old_dq.outputs[0])  # the old scale's (the graph's) float type
        if group:
            sv = add_initializer(graph, f"{base}_npu_scale", float_array(scale, ft))
            attrs: dict[str, int] = {"axis": 0, "block_size": group}
        else:
            sv = add_initializer(graph, f"{base}_npu_scale", float_array(scale.reshape(-1), ft))
            attrs = {"axis": 1}
        dq = ir.node("DequantizeLinear", [qv, sv], attrs, name=f"{base}_npu_DequantizeLinear")
        out = old_dq.outputs[0]
        dq.outputs[0].shape, dq.outputs[0].type = out.shape, out.type
        graph.insert_before(old_dq, dq)
        out.replace_all_uses_with(dq.outputs[0], replace_graph_outputs=True)  # every user (tied weights too)
        graph.remove(old_dq, safe=True)

    # ------------------------------------------------------------------ shapes

    def _static_shapes(self, model: ir.Model) -> dict[str, object]:
        graph, seq = model.graph, int(self.config.static_shapes or 0)
        kv = [v.name for v in graph.inputs if v.name and v.name.startswith("past_key_values")]
        if kv:
            raise QCError("lower-npu: --static-shapes needs a model without KV cache (this one has "
                          f"{len(kv)} past_key_values inputs): export it with 'qc export --no-kv-cache'")
        fixed: dict[str, list[int]] = {}
        for v in graph.inputs:
            if v.shape is None:
                raise QCError(f"lower-npu: graph input '{v.name}' has no shape; cannot make shapes static")
            dims: list[int] = []
            for d in v.shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d.value is not None and _BATCH.search(str(d.value)):
                    dims.append(self.config.batch)
                elif d.value is not None and _SEQ.search(str(d.value)):
                    dims.append(seq)
                else:
                    raise QCError(f"lower-npu: don't know how to fix dimension '{d}' of input '{v.name}' "
                                  "(expected batch or sequence dimensions)")
            v.shape = ir.Shape(dims)
            fixed[v.name or "?"] = dims
        for v in graph.outputs:  # let shape inference recompute output shapes
            if v.shape is not None and any(not isinstance(d, int) for d in v.shape):
                v.shape = None
        _infer_shapes(model)
        folded = _fold_shape_arithmetic(model)
        _infer_shapes(model)
        dynamic = [v.name for v in graph.outputs if v.shape is None or any(not isinstance(d, int) for d in v.shape)]
        if dynamic:
            log.warning("lower-npu: outputs %s still have dynamic shapes", dynamic)
        return {"inputs": fixed, "folded_nodes": folded, "dynamic_outputs": dynamic}


def _feeds_qdq_matmul(dq: ir.Node) -> bool:
    """Whether a weight DequantizeLinear feeds a MatMul whose activation is a DequantizeLinear too."""
    for use in dq.outputs[0].uses():
        mm = use.node
        if mm.op_type in ("MatMul", "Gemm") and mm.domain == "" and use.idx == 1:
            a = mm.inputs[0].producer() if mm.inputs[0] is not None else None
            if a is not None and a.op_type == "DequantizeLinear":
                return True
    return False


def _infer_shapes(model: ir.Model) -> None:
    import onnx_ir.passes.common as common_passes

    common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)


def _fold_shape_arithmetic(model: ir.Model) -> int:
    """Fold nodes that compute small integer shape tensors from constants (never Q/DQ or weights)."""
    from onnxscript.optimizer import fold_constants

    def should_fold(node: ir.Node) -> bool | None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _SHAPE_OPS:
            return False
        for out in node.outputs:
            if out.dtype is not None and out.dtype not in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL):
                return False
        return None  # let the folder decide (size limits, constant inputs)

    before = model.graph.num_nodes()
    fold_constants(model, onnx_shape_inference=False, input_size_limit=1 << 14, output_size_limit=1 << 16,
                   should_fold=should_fold)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    return before - model.graph.num_nodes()


def _check(model: ir.Model) -> str:
    """onnx.checker with full checking, on a temporary copy saved with its external data."""
    import tempfile

    import onnx

    from qcompiler.irutil import save_model

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > _CHECK_MAX_BYTES:
        return f"skipped in the pass ({size / 2**30:.1f} GiB of weights): run 'qc check MODEL_DIR --target npu'"
    with tempfile.TemporaryDirectory(prefix="qc-npu-check-") as tmp:
        path = f"{tmp}/model.onnx"
        save_model(model, path)
        try:
            onnx.checker.check_model(path, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise QCError(f"lower-npu: the NPU graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    return "passed (full_check)"
