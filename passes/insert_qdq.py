"""insert-qdq: write the canonical W8A8 forms (``qcompiler.quant.w8a8``) on the decoder's linears.

For ``Y = X·W``, W is quantized symmetric int8 per output channel
(``s_w[n] = max_k |W[k, n]|/127``, ``Ŵ = s_w ⊙ clamp(round(W/s_w), −127, 127)``; with
``weight_bits=7`` ``/63`` and ``[−63, 63]``, the range whose u8×s8 products ONNX Runtime's
x86 kernels cannot saturate, for QDQ graphs it fuses itself: see ``qcompiler.quant.intgemm``)
and X either

* **static per tensor**: ``X̂ = s_x·(clamp(round(X/s_x) + z_x) − z_x)`` with one ``(s_x, z_x)``
  from calibration: the range ``[lo, hi]`` is the observed min/max, or clipped by the
  ``percentile`` of ``|x|`` (each tail when asymmetric), TensorRT's ``entropy`` (KL)
  threshold or the ``mse``-optimal threshold of the histogram; int8 symmetric
  (``z = 0``), int8 asymmetric, uint8 asymmetric or uint8 symmetric (``z = 128``)
  (:func:`qcompiler.quant.w8a8.static_qparams`); or
* **dynamic per token**: ``s_t = max_k |X[t, k]|/127`` computed in the graph for each row,
  ``X̂[t] = s_t·clamp(round(X[t]/s_t), −127, 127)``.

Linears reading one activation (q/k/v, gate/up) share its quantization nodes.  An
activation spec annotated on a linear (``spec.act_spec``: granularity tensor | token,
``method``, ``symmetric``) wins over the pass options; a weight spec may only ask for
``clip=mse`` (8 bits, per channel).  lm_head, attention-score MatMuls and the KV cache
stay float (``lm_head=true`` quantizes an untied lm_head too).

Static ranges out of domain: a range calibrated on one text is exceeded on others (``qc analyze
--text``).  ``margin`` widens every static range ``[lo, hi] → [m·lo, m·hi]`` (coarser steps:
``log2 m`` bits of resolution for headroom).  ``held_back`` validates each range on held-back
windows: with ``a_w`` the input's abs-max in calibration window ``w``, the leave-one-window-out
overshoot is ``o = max_w a_w / max_{w'≠w} a_w'`` (how far a window unseen by the range would
have exceeded it), and the input's range is widened by ``o``.  ``fallback`` > 0 leaves the
activations of inputs with ``o > fallback`` in float (their weights still int8 per channel:
W8A16 for those linears; ``quantization.json`` lists them under ``insert-qdq.fallback``).
``fallback_error`` > 0 does the same for inputs whose static quantization error on sampled
calibration rows, ``‖x − Q(x)‖²/‖x‖²``, exceeds it: the layers where a few massive-activation
tokens (an attention sink) stretch the one range so far that every other token is coarse —
which no text-independent range can fix.

``fallback_budget`` = f > 0 chooses those inputs by a measured criterion under a budget instead of
a threshold: the inputs are ranked by their static error on the calibration data
(``‖x − Q(x)‖²/‖x‖²`` with the range the pass would use, margins included), and the worst keep
higher-precision activations while the linears they feed stay within ``f`` of all quantized
linears (q/k/v and gate/up share an input: choosing one counts all of its readers).  Each chosen
input is listed under ``insert-qdq.fallback`` with its error and rank.  ``fallback_dtype`` says
what they become: ``float`` (int8 weights, float activations: W8A16, what ONNX Runtime's CPU
integer kernels leave) or ``int16`` (static symmetric int16 per tensor, ``s = max|x|/32767``,
A16W8: what NPUs run where a float MatMul does not exist; on ONNX Runtime's CPU provider the
int16 Q/DQ runs unfused, as a float MatMul of the dequantized values).  The int16 range is the
8-bit one widened by ``fallback_margin`` (16: 4 of the 8 extra bits are headroom, the step is
still 8× finer than uint8's), because what an int16 input must hold out of domain is also the
overshoot: on the smoothed SmolLM2 the down_proj inputs exceed their calibrated range on
source code, and an int16 range without headroom clipped them exactly as uint8 did (+13.3%
perplexity against +5.9% with float activations).

The static error is estimated in bounded memory (``error_stats=histogram``, the default): a
``log_histogram`` per input (count, ``Σ|x|``, ``Σx²`` per sign and geometric bin of ``|x|``, 8 per
octave: 40 KiB in memory whatever the model) gives the error of any ``(scale, zero point)`` chosen after
calibration, exactly for the values that round to zero or clip and to a modelled rounding noise
for the rest (:class:`qcompiler.calibrate.histogram.LogHistogram`).  ``error_stats=sample`` computes it
on 4096 sampled rows of every input instead (``4096·C·4`` bytes per input, ~14 GB at 8B): on
SmolLM2-135M (w8a8-static-rotate, cold calibration cache) compile peak RSS 3.7 GB with the rows,
1.0 GB with the histogram, and the same 21 linears chosen.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from qcompiler.passes.quantize_weights import quantizable_linears
from tqdm import tqdm

from qcompiler.calibrate import StatRequest
from qcompiler.errors import CalibrationError, QCError
from qcompiler.finite import require_finite
from qcompiler.irutil import QUANT_OPSET, ensure_opset, linear_weight
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import stored_spec
from qcompiler.quant.numerics import quantize_weight
from qcompiler.quant.w8a8 import (
    QUANT_KEY,
    RANGE_METHODS,
    activation_range,
    attach_activation,
    emit_int8_weight,
    emit_per_token_activation,
    emit_static_activation,
    static_qparams,
)
from qcompiler.spec import (
    Granularity,
    QuantSpec,
    act_spec,
    linear_info,
    set_act_spec,
    set_weight_spec,
    weight_spec,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InsertQdqConfig:
    act: str = "per-token"  # per-token (dynamic, in-graph) | static (per-tensor, calibrated)
    method: str = "minmax"  # static range: minmax | percentile | entropy | mse
    percentile: float = 99.99
    dtype: str = "int8"  # static activation integer type: int8 | uint8
    sym: bool = True  # static activations symmetric (z = 0 for int8, 128 for uint8)
    weight_clip: str = "minmax"  # minmax | mse (per-channel int8 weights)
    weight_bits: int = 8  # 8 | 7 (int8 storage, |q| <= 63: u8×s8 exact on every CPU)
    lm_head: bool = False
    skip: str = ""  # ':'-separated linear keys left in float
    # out-of-domain guards for static ranges (issue 22): see the module docstring
    margin: float = 1.0  # every static range widened by this factor
    held_back: bool = False  # per input: widen by its leave-one-window-out overshoot
    fallback: float = 0.0  # > 0: inputs whose held-back overshoot exceeds this keep float activations
    fallback_error: float = 0.0  # > 0: inputs whose static error on calibration rows exceeds this keep float
    fallback_budget: float = 0.0  # > 0: the worst inputs by static error, up to this fraction of the linears
    fallback_dtype: str = "float"  # what fallback inputs become: float (W8A16) | int16 (A16W8 QDQ)
    fallback_margin: float = 16.0  # int16 fallback: range widened by this (headroom for out-of-domain overshoot)
    error_stats: str = "histogram"  # static error from: histogram (log_histogram, 40 KiB per input) | sample (rows)

    @property
    def measures_static_error(self) -> bool:
        """Whether a fallback criterion reads each input's static error on sampled calibration rows."""
        return self.fallback_error > 0 or self.fallback_budget > 0

    def __post_init__(self) -> None:
        if self.margin < 1.0:
            raise ValueError(f"margin must be at least 1, got {self.margin}")
        if self.fallback and self.fallback < 1.0:
            raise ValueError(f"fallback must be 0 (off) or an overshoot ratio of at least 1, got {self.fallback}")
        if not 0.0 <= self.fallback_budget < 1.0:
            raise ValueError(f"fallback_budget must be a fraction of the linears in [0, 1), got {self.fallback_budget}")
        if self.fallback_margin < 1.0:
            raise ValueError(f"fallback_margin must be at least 1, got {self.fallback_margin}")
        if self.error_stats not in ("histogram", "sample"):
            raise ValueError(f"error_stats must be histogram or sample, got {self.error_stats}")
        if self.fallback_dtype not in ("float", "int16"):
            raise ValueError(f"fallback_dtype must be float or int16, got {self.fallback_dtype}")
        if self.act not in ("per-token", "static"):
            raise ValueError(f"act must be per-token or static, got {self.act}")
        if self.method not in RANGE_METHODS:
            raise ValueError(f"method must be one of {', '.join(RANGE_METHODS)}, got {self.method}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.dtype not in ("int8", "uint8"):
            raise ValueError(f"dtype must be int8 or uint8, got {self.dtype}")
        if self.weight_clip not in ("minmax", "mse"):
            raise ValueError(f"weight_clip must be minmax or mse, got {self.weight_clip}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {self.weight_bits}")

    def act_spec(self) -> QuantSpec:
        gran = Granularity.TOKEN if self.act == "per-token" else Granularity.TENSOR
        method = "dynamic" if self.act == "per-token" else self.method
        return QuantSpec(bits=8, symmetric=self.sym or self.act == "per-token", granularity=gran, method=method)


def _weight_spec(node: ir.Node, default_clip: str, key: str, bits: int = 8) -> QuantSpec:
    spec = weight_spec(node)
    clip = default_clip
    if spec is not None:
        if spec.bits != 8:
            raise QCError(f"insert-qdq: {key} is annotated for int{spec.bits} weights; W8A8 needs 8 bits")
        clip = spec.clip
    return QuantSpec(bits=bits, symmetric=True, granularity=Granularity.CHANNEL, method="rtn", clip=clip)


def _held_back_overshoot(stats: Any, name: str) -> float:
    """``max_w a_w / max_{w'≠w} a_w'`` from per-window channel abs-maxima (1 with fewer than 2 windows)."""
    try:
        per = np.asarray(stats.get(name, "absmax_channel_window").absmax, np.float64)
    except (CalibrationError, KeyError):
        return 1.0
    if per.ndim != 2 or per.shape[0] < 2:
        return 1.0
    a = per.max(axis=1)
    top2 = np.sort(a)[-2:]
    return float(top2[1] / top2[0]) if top2[0] > 0 else 1.0


def _static_error(stats: Any, name: str, scale: float, zp: int, dtype: str, source: str = "histogram") -> float:
    """``‖x − Q(x)‖²/‖x‖²`` of the static quantizer on the calibration data (0 without statistics): from the
    ``log_histogram`` of every value (``source="histogram"``) or on the sampled rows (``"sample"``)."""
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    if source == "histogram":
        try:
            return stats.get(name, "log_histogram").static_error(scale, zp, lo, hi)
        except (CalibrationError, KeyError):
            return 0.0
    try:
        rows = np.asarray(stats.get(name, "sample").rows, np.float64)
    except (CalibrationError, KeyError):
        return 0.0
    xq = (np.clip(np.rint(rows / scale) + zp, lo, hi) - zp) * scale
    return float(((rows - xq) ** 2).sum() / max(float((rows**2).sum()), 1e-30))


@register_pass
class InsertQdq(QCPass):
    """Insert W8A8 quantization (static per-tensor or per-token activations, int8 per-channel weights)."""

    name = "insert-qdq"
    Config = InsertQdqConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: InsertQdqConfig = self.config
        graph = model.graph
        nodes = quantizable_linears(model, cfg.lm_head, frozenset(filter(None, cfg.skip.split(":"))))
        nodes = [n for n in nodes if n.op_type == "MatMul"]
        if not nodes:
            log.warning("insert-qdq: no float linear to quantize")
            return ir.passes.PassResult(model, modified=False)
        default = cfg.act_spec()
        groups: dict[int, list[ir.Node]] = defaultdict(list)  # shared input → linears with one act spec
        specs: dict[int, QuantSpec] = {}
        for n in nodes:
            spec = act_spec(n) or default
            key = id(n.inputs[0])
            if key in specs and specs[key] != spec:
                key = id(n)  # a different spec on a shared input: quantize separately
            specs[key] = spec
            groups[key].append(n)
        qparams = self._static_params({k: g for k, g in groups.items() if specs[k].granularity == Granularity.TENSOR},
                                      specs, model)
        fallback = {k: {"held_back_overshoot": round(v, 3)} for k, v in self._overshoot.items()
                    if cfg.fallback and v > cfg.fallback}
        for k, e in self._static_error.items():
            if cfg.fallback_error and e > cfg.fallback_error:
                fallback.setdefault(k, {})["static_error"] = float(f"{e:.4g}")
        if cfg.fallback_budget > 0:
            self._budget_fallback(groups, fallback, sum(len(g) for g in groups.values()))
        for k, why in fallback.items():
            log.info("insert-qdq: %s: %s: activations stay float", linear_info(groups[k][0]).key, why)  # type: ignore[union-attr]
        fallback_report = {linear_info(groups[k][0]).key: why for k, why in fallback.items()}  # type: ignore[union-attr]
        for k in fallback:  # int8 weights, float (W8A16) or int16 (A16W8) activations for these
            if cfg.fallback_dtype == "int16":
                members = groups[k]
                first = linear_info(members[0]).key  # type: ignore[union-attr]
                scale = self._int16_scale[k]
                emit_static_activation(graph, members[0], scale, 0, "int16", first.replace(".", "_") + "_a16")
                fallback[k]["int16_scale"] = scale
                for n in members[1:]:
                    attach_activation(n, members[0].inputs[0], "static")  # type: ignore[arg-type]
                for n in members:  # not a W8A8 form: no lowering takes it for one
                    n.metadata_props[QUANT_KEY] = "a16w8-static"
            for n in groups[k]:
                self._weight(graph, n, linear_info(n).key)  # type: ignore[union-attr]
        all_groups = groups
        groups = {k: g for k, g in groups.items() if k not in fallback}
        counts: Counter[str] = Counter()
        act_report: dict[str, Any] = {}
        for key, members in tqdm(groups.items(), desc="insert-qdq", unit="input", leave=False):
            spec = specs[key]
            first = linear_info(members[0]).key  # type: ignore[union-attr]
            base = first.replace(".", "_")
            if spec.granularity == Granularity.TOKEN:
                emit_per_token_activation(graph, members[0], base)
                kind = "per-token"
            elif spec.granularity == Granularity.TENSOR:
                scale, zp, dtype = qparams[key]
                emit_static_activation(graph, members[0], scale, zp, dtype, base)
                kind = "static"
                act_report[first] = {"scale": scale, "zero_point": zp, "dtype": dtype, "method": spec.method}
            else:
                raise QCError(f"insert-qdq: {first}: activation granularity '{spec.granularity}' is not "
                              "supported for W8A8 (tensor or token)")
            for n in members[1:]:
                attach_activation(n, members[0].inputs[0], kind)  # type: ignore[arg-type]
            for n in members:
                info = linear_info(n)
                self._weight(graph, n, info.key)  # type: ignore[union-attr]
                set_act_spec(n, spec)
                counts[f"{kind} {spec.method}"] += 1
        ensure_opset(model, "", QUANT_OPSET)
        self.context.report[self.name] = {
            "linears": dict(counts),
            "activations": act_report,
            "held_back_overshoot": {linear_info(members[0]).key: round(v, 3)  # type: ignore[union-attr]
                                    for k, members in groups.items() if (v := self._overshoot.get(k)) is not None}
            if self._overshoot else None,
            "fallback": fallback_report,
            "fallback_linears": sum(len(g) for k, g in all_groups.items() if k in fallback),
            "fallback_dtype": cfg.fallback_dtype if fallback else None,
            "float": "lm_head, attention score MatMuls and the KV cache" if not cfg.lm_head
            else "attention score MatMuls and the KV cache",
        }
        log.info("insert-qdq: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
        return ir.passes.PassResult(model, modified=True)

    def _budget_fallback(self, groups: dict[int, list[ir.Node]], fallback: dict[int, dict[str, Any]],
                         n_linears: int) -> None:
        """Add the inputs of largest static error to ``fallback`` while their linears fit the budget."""
        limit = int(np.floor(self.config.fallback_budget * n_linears + 1e-9))
        used = sum(len(groups[k]) for k in fallback)
        ranked = sorted(self._static_error, key=lambda k: -self._static_error[k])
        for rank, k in enumerate(ranked, 1):
            if k in fallback:
                continue
            if used + len(groups[k]) > limit:
                continue  # a smaller input further down may still fit
            used += len(groups[k])
            fallback[k] = {"static_error": float(f"{self._static_error[k]:.4g}"), "rank": rank}

    def _weight(self, graph: ir.Graph, node: ir.Node, key: str) -> None:
        spec = stored_spec(_weight_spec(node, self.config.weight_clip, key, self.config.weight_bits), graph, node)
        w_val, _ = linear_weight(node)  # type: ignore[misc]
        w = w_val.const_value.numpy()  # type: ignore[union-attr]
        require_finite(w, f"insert-qdq: weight '{w_val.name}' of {key}")
        qw = quantize_weight(w, spec)
        emit_int8_weight(graph, node, qw.q, qw.scale.reshape(-1), f"{key}.weight")
        set_weight_spec(node, spec)

    def _static_params(self, groups: dict[int, list[ir.Node]], specs: dict[int, QuantSpec],
                       model: ir.Model) -> dict[int, tuple[float, int, str]]:
        """``(scale, zero point, dtype)`` of each static activation, from calibration statistics."""
        self._overshoot: dict[int, float] = {}
        self._static_error: dict[int, float] = {}
        self._int16_scale: dict[int, float] = {}
        if not groups:
            return {}
        cfg: InsertQdqConfig = self.config
        calibrate = self.context.require_calibration(self.name)
        requests = []
        loo = cfg.held_back or cfg.fallback > 0
        for key, members in groups.items():
            obs = ("minmax",) if specs[key].method == "minmax" else ("minmax", "histogram")
            if loo:
                obs = (*obs, "absmax_channel_window")
            if cfg.measures_static_error:
                obs = (*obs, "log_histogram" if cfg.error_stats == "histogram" else "sample")
            requests.append(StatRequest(members[0].inputs[0].name, obs))  # type: ignore[union-attr]
        stats = calibrate(model, requests)
        out: dict[int, tuple[float, int, str]] = {}
        for key, members in groups.items():
            spec = specs[key]
            name = members[0].inputs[0].name  # type: ignore[union-attr]
            where = linear_info(members[0]).key  # type: ignore[union-attr]
            try:
                mm = stats.get(name, "minmax")
                hist = stats.get(name, "histogram") if spec.method != "minmax" else None
            except (CalibrationError, KeyError) as e:
                raise CalibrationError(f"insert-qdq: {where}: statistics missing for value '{name}': {e}") from None
            lo, hi = activation_range(spec.method, (mm.min, mm.max), hist, cfg.percentile, spec.symmetric)
            m = cfg.margin
            if loo:
                o = _held_back_overshoot(stats, name)
                self._overshoot[key] = o
                if cfg.held_back:
                    m *= o
            lo, hi = lo * m, hi * m
            scale, zp = static_qparams(lo, hi, cfg.dtype, spec.symmetric)
            out[key] = (scale, zp, cfg.dtype)
            if cfg.measures_static_error:
                self._static_error[key] = _static_error(stats, name, scale, zp, cfg.dtype, cfg.error_stats)
            fm = cfg.fallback_margin
            self._int16_scale[key] = static_qparams(lo * fm, hi * fm, "int16", True)[0]
        return out
