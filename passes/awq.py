"""awq: activation-aware per-channel scales, folded into the graph, then clipped group-wise quantization.

For linears sharing an input ``X`` (q/k/v after the attention RMSNorm, gate/up after the
MLP RMSNorm, o after v, down after up)::

    Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W)

``s = mean|X|^α`` (α searched on calibration data against the group's output error
``tr(ΔᵀHΔ)``, ``H = XᵀX``; :mod:`qcompiler.quant.awq`) and ``diag(s)·W`` is what gets
quantized, so salient input channels get a finer grid.  ``diag(s)⁻¹`` is folded into
what produces X, so the graph computes the same function before rounding:

* norm → q/k/v, gate/up: ``γ ← γ / s`` (``x̂ = γ ⊙ x/rms(x)`` is linear in γ), with a LayerNorm
  also ``β ← β / s``, Gemma's ``(1 + w)`` as ``w ← (1 + w)/s − 1`` (``passes/_channels.py``,
  ``affine_site``: any ``X = γ ⊙ z (+ β)`` read only by the group; a parallel block's one norm
  feeding attention and MLP is one group);
* v → o: ``W_v[:, j] ← W_v[:, j] / s_j``; attention is linear in V per channel
  (``softmax(q·kᵀ)·V``), so o's input channel c scales by ``1/s_{m(c)}``, m(c) being the
  v channel feeding it (with grouped-query attention several o channels share one v
  channel and one scale);
* up → down: ``W_up[:, j] ← W_up[:, j] / s_j``, and ``act(x·W_g) ⊙ (x·W_up)`` is linear in
  the up channel.

The channel map m is found by a probe, not from names or shapes: layer i is run on one
window with ``W_prev``'s columns scaled by distinct factors ``r_j``; o's (down's) input
channel c must then scale by exactly one ``r_j`` (least-squares fit, residual < 1e-4),
else that fold is skipped.  After the scales, each linear's group ranges are clipped
(shrink ratio per group and column minimizing ``e_gᵀ·H_gg·e_g``; ``clip_qk=false`` leaves
q/k alone, as AutoAWQ does) and rounded to the grid, written in the portable DequantizeLinear form.
Scales are rounded to powers of two (``pow2``, default): then ``x/s`` and ``s·w`` are
exact in binary floating point, every product ``x·w`` is bit-for-bit unchanged, and the
folded graph computes exactly what the original did.  Layers run one at a time
(:mod:`qcompiler.layerwise`), on inputs from the quantized previous layers
(``sequential``, default) or from the float model.  ``fold_only`` applies the scales and
stops (the logits do not change: a check of the folding).  ``gptq`` rounds the scaled
weights with GPTQ (:mod:`qcompiler.quant.gptq`, the same Hessians rescaled, the clipped
ranges as its static groups) instead of round-to-nearest.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from qcompiler.models.llama import match_rmsnorm
from qcompiler.passes._channels import AffineSite, affine_site, scale_affine
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig, quantizable_linears
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from qcompiler.floattype import float_array, float_type
from qcompiler.irutil import QUANT_OPSET, ensure_opset, linear_weight
from qcompiler.layerwise import DecoderLayer, LayerwiseRunner
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.awq import clip_ratios, quadratic_error, search_scales
from qcompiler.quant.emit import emit_dequantized_weight, stored_spec
from qcompiler.quant.gptq import gptq_quantize
from qcompiler.quant.numerics import quantize_rtn, quantize_weight
from qcompiler.spec import QuantSpec, Role, linear_info, weight_spec

log = logging.getLogger(__name__)

#: ``node.meta`` of a v/up linear whose output columns AWQ divided by the next linear's scales
OUTPUT_SCALE_KEY = "qc.awq.output_scale"


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    sym: bool = False
    grid: int = 20  # α ∈ {0, 1/grid, ..., (grid−1)/grid}
    clip: bool = True  # output-aware clipping search
    clip_qk: bool = True  # ... also for q/k (AutoAWQ leaves them out; on SmolLM2 clipping them helps)
    max_shrink: float = 0.5
    sequential: bool = True  # inputs of layer i from the quantized layers 0..i−1
    fold_prev_linear: bool = True  # also v→o and up→down
    pow2: bool = True  # scales rounded to powers of two: folding them is exact in float
    fold_only: bool = False  # apply the scales, keep float weights
    gptq: bool = False  # round the scaled weights with GPTQ (same Hessians) instead of RTN
    damp: float = 0.01  # gptq=true: GPTQ's damping (λ = damp·mean diag H)
    skip: str = ""

    def __post_init__(self) -> None:
        QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size)  # same checks
        if self.grid < 1:
            raise ValueError(f"grid must be at least 1, got {self.grid}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")

    def spec(self) -> QuantSpec:
        qw = QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size, sym=self.sym)
        return dataclasses.replace(qw.spec(), method="awq")


@dataclass
class ScaleGroup:
    """Linears sharing ``x``, and what produces x: an RMSNorm (``norm``) or a linear (``prev``)."""

    members: list[ir.Node]
    x: ir.Value
    norm: AffineSite | None = None  # X = γ ⊙ z (+ β): where 1/s folds
    prev: ir.Node | None = None
    channel_map: np.ndarray | None = None  # x channel → prev output column


def _weight(node: ir.Node) -> ir.Value:
    return linear_weight(node)[0]  # type: ignore[index]


def _set_weight(value: ir.Value, array: np.ndarray) -> None:
    """Write ``array`` (computed wide) back in the weight's own float type."""
    value.const_value = ir.tensor(float_array(array, float_type(value)), name=value.name)


@register_pass
class AWQ(QCPass):
    """Activation-aware weight quantization with scales folded into the graph (see module docstring)."""

    name = "awq"
    Config = AWQConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: AWQConfig = self.config
        calibrator = self.context.require_calibration(self.name)
        nodes = quantizable_linears(model, False, frozenset(filter(None, cfg.skip.split(":"))))
        runner = LayerwiseRunner.from_calibrator(model, calibrator)
        wanted = {id(n) for n in nodes}
        report: dict[str, dict[str, object]] = {}
        weights: dict[str, str] = {}
        ensure_opset(model, "", QUANT_OPSET)
        runner.start()
        try:
            for layer in tqdm(runner.layers, desc="awq", unit="layer", disable=not runner.progress):
                groups = self._groups(model, layer, wanted)
                if cfg.fold_prev_linear:
                    self._probe(runner, layer, groups)
                xs = {g.x.name for g in groups}
                stats = runner.observe(layer.index, {x: ("mean_abs_channel", "hessian") for x in xs})
                if not cfg.sequential:
                    runner.advance()
                hess = {x: stats[x]["hessian"].xtx.astype(np.float32) for x in xs}
                with threadpool_limits(1, user_api="blas"):  # small GEMMs: one BLAS thread is faster
                    for g in groups:
                        report.update(self._scale(model, g, hess, stats[g.x.name]["mean_abs_channel"]))
                    for g in [] if cfg.fold_only else groups:
                        for node in g.members:
                            if id(node) in wanted:
                                weights[linear_info(node).key] = self._quantize(model, node, hess[g.x.name])
                if cfg.sequential:
                    runner.advance()
        finally:
            runner.close()
        self.context.report.setdefault("weights", {}).update(weights)
        self.context.report["awq"] = {"calibration_windows": runner.num_windows, "groups": report}
        log.info("awq: %d scale groups, %d linears quantized", len(report), len(weights))
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------------------- structure

    def _groups(self, model: ir.Model, layer: DecoderLayer, wanted: set[int]) -> list[ScaleGroup]:
        lin = layer.linears
        groups: list[ScaleGroup] = []
        taken: set[int] = set()
        for roles, prev_role in (((Role.Q, Role.K, Role.V, Role.QKV, Role.GATE, Role.UP, Role.GATE_UP), None),
                                 ((Role.Q, Role.K, Role.V, Role.QKV), None), ((Role.O,), Role.V),
                                 ((Role.GATE, Role.UP, Role.GATE_UP), None), ((Role.DOWN,), Role.UP)):
            members = [lin[r] for r in roles if r in lin]
            if not members or not any(id(m) in wanted for m in members) or any(id(m) in taken for m in members):
                continue
            x = members[0].inputs[0]
            if any(m.inputs[0] is not x for m in members):
                continue  # (a parallel block's shared norm is the first, widest group)
            taken |= {id(m) for m in members}
            group = ScaleGroup(members, x)
            if prev_role is None:
                users = {id(u) for u in x.consumers() if u.op_type not in ("Shape", "Size")}
                if users == {id(m) for m in members}:
                    group.norm = affine_site(x, int(_weight(members[0]).shape[0]))
            elif self.config.fold_prev_linear and prev_role in lin:
                prev = lin[prev_role]
                if len(_weight(prev).uses()) == 1:
                    group.prev = prev
            if group.norm is None and group.prev is None:
                log.info("awq: layer %d %s: no foldable producer; quantized without scales",
                         layer.index, "/".join(linear_info(m).role.value for m in members))
            groups.append(group)
        return groups

    def _probe(self, runner: LayerwiseRunner, layer: DecoderLayer, groups: list[ScaleGroup]) -> None:
        """Find each prev→x channel map by scaling prev's columns on one window (module docstring)."""
        probed = [g for g in groups if g.prev is not None]
        if not probed:
            return
        names = [g.x.name for g in probed]
        base = dict(zip(names, next(iter(runner.run(layer.index, names, windows=[0])))[1]))
        for g in probed:
            w_val = _weight(g.prev)  # type: ignore[arg-type]
            original = w_val.const_value
            w = original.numpy()
            r = (2.0 ** (np.arange(w.shape[1]) / w.shape[1])).astype(np.float32)
            _set_weight(w_val, w * r)
            try:
                out = next(iter(runner.run(layer.index, [g.x.name], windows=[0])))[1][0]
            finally:
                w_val.const_value = original
            g.channel_map = _fit_channel_map(base[g.x.name], out, r)
            if g.channel_map is None:
                log.info("awq: layer %d: %s's input is not a channel-wise scaling of %s's output; not folded",
                         layer.index, linear_info(g.members[0]).role.value, linear_info(g.prev).role.value)
                g.prev = None

    # ------------------------------------------------------------------------- scaling and quantizing

    def _scale(self, model: ir.Model, g: ScaleGroup, hess: dict[str, np.ndarray],
               x_mean: np.ndarray) -> dict[str, dict[str, object]]:
        cfg: AWQConfig = self.config
        key = "+".join(linear_info(m).key for m in g.members)
        if g.norm is None and g.prev is None:
            return {key: {"alpha": None, "folded_into": None}}
        spec = stored_spec(weight_spec(g.members[0]) or cfg.spec(), model.graph, g.members[0])
        ws = [_weight(m).const_value.numpy().astype(np.float32) for m in g.members]
        w = np.concatenate(ws, axis=1)
        h = hess[g.x.name]
        s, alpha, errors = search_scales(w, h, x_mean, spec, cfg.grid, tie=g.channel_map, pow2=cfg.pow2)
        for m, wm in zip(g.members, ws):
            _set_weight(_weight(m), wm * s[:, None])
        if g.norm is not None:
            scale_affine(model.graph, g.norm, 1.0 / s, f"awq_{key.split('+')[0]}")
            folded = g.norm.form if g.norm.form != "mul" else "rmsnorm" if match_rmsnorm(g.x) else "norm"
        else:
            prev_w = _weight(g.prev)
            pw = prev_w.const_value.numpy().astype(np.float32)
            s_prev = np.ones(pw.shape[1], np.float32)
            s_prev[g.channel_map] = s
            _set_weight(prev_w, pw / s_prev[None, :])
            g.prev.meta[OUTPUT_SCALE_KEY] = g.prev.meta.get(OUTPUT_SCALE_KEY, 1.0) / s_prev  # its output is Y/s
            folded = linear_info(g.prev).role.value
        hess[g.x.name] = h / np.outer(s, s).astype(np.float32)
        ratio = errors[round(alpha * cfg.grid)] / max(errors[0], 1e-30)
        return {key: {"alpha": alpha, "folded_into": folded, "error_vs_rtn": ratio}}

    def _quantize(self, model: ir.Model, node: ir.Node, h: np.ndarray) -> str:
        cfg: AWQConfig = self.config
        info = linear_info(node)
        spec = stored_spec(weight_spec(node) or cfg.spec(), model.graph, node)
        w = _weight(node).const_value.numpy().astype(np.float32)
        ratios = None
        if cfg.clip and (cfg.clip_qk or info.role not in (Role.Q, Role.K, Role.QKV)):
            ratios = clip_ratios(w, h, spec, cfg.grid, cfg.max_shrink)
        if cfg.gptq:
            qw = gptq_quantize(w, h, spec, ratios=ratios, damp=cfg.damp)
        elif ratios is not None:
            qw = quantize_rtn(w, spec, ratios)
        else:
            qw = quantize_weight(w, spec)
        log.debug("awq: %s relative output error %.4g", info.key,
                  quadratic_error(w - qw.dequantize(), h) / max(quadratic_error(w, h), 1e-30))
        emit_dequantized_weight(model.graph, node, qw, base_name=f"{info.key}.weight")
        return spec.describe()


def _fit_channel_map(base: np.ndarray, probed: np.ndarray, r: np.ndarray) -> np.ndarray | None:
    """Channel c of ``probed`` ≈ ``r_{m(c)}``·channel c of ``base`` for all tokens: return m, else None."""
    b = base.reshape(-1, base.shape[-1]).astype(np.float64)
    p = probed.reshape(-1, probed.shape[-1]).astype(np.float64)
    den = np.sum(b * b, axis=0)
    if np.any(den <= 0):
        return None
    fit = np.sum(b * p, axis=0) / den
    resid = np.sqrt(np.sum((p - fit * b) ** 2, axis=0) / np.maximum(np.sum(p * p, axis=0), 1e-300))
    m = np.abs(fit[:, None] - r[None, :].astype(np.float64)).argmin(axis=1)
    spacing = float(np.min(np.diff(r))) if len(r) > 1 else 1.0
    if np.any(resid > 1e-4) or np.any(np.abs(fit - r[m]) > spacing / 4):
        return None
    return m
