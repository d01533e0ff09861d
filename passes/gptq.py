"""gptq: sequential, Hessian-aware weight quantization of every decoder linear.

Per linear ``Y = X·W``, GPTQ minimizes ``‖X·W − X·Ŵ‖²`` over grid points ``Ŵ`` by rounding
one input row of W at a time and moving the error onto the rows not yet rounded
(``δ = (w_k − q(w_k))/[H⁻¹]_kk``, ``w_j −= δ·[H⁻¹]_kj``; see
:mod:`qcompiler.quant.gptq`), with ``H = XᵀX`` from calibration data.

*Sequential*: layer i's Hessians come from the outputs of layers 0..i−1 already
quantized (the layer-wise runner, :mod:`qcompiler.layerwise`), so each layer corrects
the error that reaches it.  With ``true_sequential`` (default) this holds inside a
layer too: q/k/v first; o's Hessian after q/k/v are quantized; gate/up after o; down
after gate/up.  Each stage runs only the part of the layer its input needs.

Options: ``act_order`` (rows by decreasing ``H_kk``, with static groups so the result
is exactly the contiguous group-wise format of MatMulNBits / block DequantizeLinear),
``damp`` (``λ = damp·mean diag H``), ``block_size`` (lazy-update block), ``clip``
(``minmax`` or ``mse`` group ranges).  Output: the portable form
``MatMul(X, DequantizeLinear(q, s, z))``, like ``quantize-weights``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig, quantizable_linears
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from qcompiler.errors import QCError
from qcompiler.irutil import QUANT_OPSET, ensure_opset, linear_weight
from qcompiler.layerwise import LayerwiseRunner
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import emit_dequantized_weight, stored_spec
from qcompiler.quant.gptq import gptq_quantize, output_error
from qcompiler.quant.numerics import quantize_weight
from qcompiler.spec import QuantSpec, Role, linear_info, weight_spec

log = logging.getLogger(__name__)

#: Stages of one decoder layer under true-sequential GPTQ (each reads one distinct input).
STAGES: tuple[tuple[Role, ...], ...] = (
    (Role.Q, Role.K, Role.V, Role.QKV),
    (Role.O,),
    (Role.GATE, Role.UP, Role.GATE_UP),
    (Role.DOWN,),
)


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    sym: bool = False
    clip: str = "minmax"  # minmax | mse: each group's range
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    skip: str = ""  # ':'-separated linear keys to leave in float

    def __post_init__(self) -> None:
        QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size, clip=self.clip)  # same checks
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    def spec(self) -> QuantSpec:
        qw = QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, clip=self.clip)
        return dataclasses.replace(qw.spec(), method="gptq")


@register_pass
class GPTQ(QCPass):
    """GPTQ weight quantization, layer by layer on calibration data (see module docstring)."""

    name = "gptq"
    Config = GPTQConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: GPTQConfig = self.config
        calibrator = self.context.require_calibration(self.name)
        nodes = quantizable_linears(model, False, frozenset(filter(None, cfg.skip.split(":"))))
        runner = LayerwiseRunner.from_calibrator(model, calibrator)
        wanted = {id(n) for n in nodes}
        default = cfg.spec()
        report: dict[str, dict[str, object]] = {}
        ensure_opset(model, "", QUANT_OPSET)  # int4 DequantizeLinear in the layer sessions
        runner.start()
        try:
            for layer in tqdm(runner.layers, desc="gptq", unit="layer", disable=not runner.progress):
                members = [n for n in layer.linears.values() if id(n) in wanted]
                stages = [[n for n in members if linear_info(n).role in roles] for roles in STAGES]
                stages = [s for s in stages if s]
                if not cfg.true_sequential and stages:
                    stages = [[n for s in stages for n in s]]
                for stage in stages:
                    inputs = {n.inputs[0].name for n in stage}
                    stats = runner.observe(layer.index, {x: ("hessian",) for x in inputs})
                    for node in stage:
                        hess = stats[node.inputs[0].name]["hessian"]
                        report[linear_info(node).key] = self._quantize(model, node, hess.xtx, default)
                runner.advance()
        finally:
            runner.close()
        self.context.report.setdefault("weights", {}).update({k: r.pop("spec") for k, r in report.items()})
        self.context.report["gptq"] = {
            "calibration_windows": runner.num_windows,
            "relative_output_error": report,
            "mean_error_ratio_vs_rtn": float(np.mean([r["gptq"] / max(r["rtn"], 1e-30) for r in report.values()]))  # type: ignore[operator]
            if report else None,
        }
        log.info("gptq: %d linears quantized; mean output error %.3g× RTN's", len(report),
                 self.context.report["gptq"]["mean_error_ratio_vs_rtn"] or float("nan"))
        return ir.passes.PassResult(model, modified=bool(report))

    def _quantize(self, model: ir.Model, node: ir.Node, xtx: np.ndarray, default: QuantSpec) -> dict[str, object]:
        cfg: GPTQConfig = self.config
        info = linear_info(node)
        spec = stored_spec(weight_spec(node) or default, model.graph, node)
        w_val, _ = linear_weight(node)  # type: ignore[misc]
        w = w_val.const_value.numpy().astype(np.float32)
        try:
            qw = gptq_quantize(w, xtx, spec, act_order=cfg.act_order, damp=cfg.damp, block=cfg.block_size,
                               clip=spec.clip)
        except (ValueError, np.linalg.LinAlgError) as e:
            raise QCError(f"gptq: {info.key}: {e}") from None
        with threadpool_limits(1, user_api="blas"):
            errors: dict[str, object] = {
                "gptq": output_error(w, qw.dequantize(), xtx),
                "rtn": output_error(w, quantize_weight(w, spec).dequantize(), xtx),
                "spec": spec.describe(),
            }
        emit_dequantized_weight(model.graph, node, qw, base_name=f"{info.key}.weight")
        return errors

