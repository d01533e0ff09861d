"""quantize-kv-cache: the KV cache of every fused GroupQueryAttention stored in int8 or int4.

ONNX Runtime's ``com.microsoft.GroupQueryAttention`` (1.32, CPU) keeps a quantized cache
itself (probed against its op schema and run in ``tests/passes/test_quantize_kv_cache.py``):
with ``kv_cache_bit_width = b`` ∈ {8, 4}, ``k_quant_type``/``v_quant_type`` ∈ {PER_TENSOR,
PER_CHANNEL} and static float32 scales ``k_scale``/``v_scale`` (``[1]`` or ``[1, KV, 1, H]``)
it appends the new keys/values to the past as

    q = clamp(round(x / s), −2^(b−1), 2^(b−1) − 1)       (symmetric, no zero point)

int8 ``[B, KV, T, H]``, or int4 stored as ``q + 8`` two per byte (element ``2j`` in the low
nibble of byte ``j``) in uint8 ``[B, KV, T, H/2]``, and attends over ``x̂ = q·s`` in float —
the new tokens' keys/values included, so prefill sees the rounding too.  This pass sets those
attributes, adds the scales and retypes ``past_key_values.*``/``present.*``; the model's
interface is otherwise the same (the past length is still axis 2).

Scales come from calibration of the GQA node's ``key`` input (after rotary, and after the q/k
norm where the family has one) and its ``value`` input, through the streaming observers:

    per channel c = (kv head, dim):  s_c = r_c · max_t |x[t, c]| / (2^(b−1) − 1)
    per tensor:                      s   = r   · max_{t,c} |x[t, c]| / (2^(b−1) − 1)

with ``r = 1`` (``clip=minmax``) or, with ``clip=mse``, the ratio in [0.5, 1] minimizing
``Σ_t (x − x̂)²`` over the calibration sample rows (per channel or per tensor).  Per-channel
keys are KIVI's choice (a few key channels carry large magnitudes after rotary).  Values
would prefer per-token scales (KIVI); the kernel has no such mode, so values are per channel
(one static scale per kv head and dim) or per tensor, like the keys (the CPU kernel refuses
``k_quant_type ≠ v_quant_type``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.calibrate import StatRequest
from qcompiler.errors import UnsupportedModelError
from qcompiler.irutil import MS_DOMAIN, add_initializer
from qcompiler.pipeline import QCPass, register_pass

log = logging.getLogger(__name__)

GRANULARITY = {"tensor": "PER_TENSOR", "channel": "PER_CHANNEL"}
#: ``clip=mse`` candidate ratios of the absolute maximum
MSE_RATIOS = np.linspace(0.5, 1.0, 21)


@dataclass(frozen=True)
class KVCacheConfig:
    bits: int = 8  # 8 (int8 cache) | 4 (int4 packed two per uint8)
    k_granularity: str = "channel"  # channel | tensor
    v_granularity: str = "channel"  # channel | tensor
    clip: str = "minmax"  # minmax | mse (ratio of the absmax per scale, on calibration samples)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4 (ONNX Runtime's GroupQueryAttention caches), got {self.bits}")
        for g in (self.k_granularity, self.v_granularity):
            if g not in GRANULARITY:
                raise ValueError(f"granularity must be tensor or channel, got '{g}'")
        if self.k_granularity != self.v_granularity:  # measured: group_query_attention.cc refuses it at run time
            raise ValueError("ONNX Runtime's CPU GroupQueryAttention requires k_quant_type == v_quant_type: "
                             f"k_granularity={self.k_granularity} and v_granularity={self.v_granularity} differ")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be minmax or mse, got '{self.clip}'")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def fake_quant(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """``clamp(round(x / s)) · s`` as the kernel computes it (round half to even, symmetric)."""
    q = np.clip(np.rint(x / scale), -qmax(bits) - 1, qmax(bits))
    return q * scale


def cache_scales(absmax: np.ndarray, rows: np.ndarray | None, kv_heads: int, bits: int, granularity: str,
                 clip: str) -> np.ndarray:
    """Static scales from per-channel absmax ``[KV·H]`` (and sample rows ``[n, KV·H]`` for ``clip=mse``):
    ``[1, KV, 1, H]`` per channel, ``[1]`` per tensor (see the module docstring)."""
    absmax = np.asarray(absmax, np.float64)
    per_channel = granularity == "channel"
    amax = absmax if per_channel else np.array([absmax.max()])
    amax = np.maximum(amax, 1e-8)
    ratio = np.ones_like(amax)
    if clip == "mse" and rows is not None and len(rows):
        x = np.asarray(rows, np.float64) if per_channel else np.asarray(rows, np.float64).reshape(-1, 1)
        errs = np.stack([((fake_quant(x, r * amax / qmax(bits), bits) - x) ** 2).sum(0) for r in MSE_RATIOS])
        ratio = MSE_RATIOS[errs.argmin(0)]
    scale = (ratio * amax / qmax(bits)).astype(np.float32)
    if per_channel:
        return scale.reshape(1, kv_heads, 1, -1)
    return scale.reshape(1)


def _gqa_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]


def _check_cache_io(graph: ir.Graph, gqa: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """The node's past inputs / present outputs: graph inputs / outputs, the past read only by it and ``Shape``."""
    pk, pv = (gqa.inputs[i] if len(gqa.inputs) > i else None for i in (3, 4))
    outs = list(gqa.outputs)
    prk, prv = (outs[i] if len(outs) > i else None for i in (1, 2))
    if pk is None or pv is None or prk is None or prv is None:
        raise UnsupportedModelError(f"{gqa.name}: GroupQueryAttention without past/present cache: nothing to quantize "
                                    "(export with the KV cache)")
    graph_outputs = {id(v) for v in graph.outputs}
    for v in (pk, pv):
        if not v.is_graph_input():
            raise UnsupportedModelError(f"{gqa.name}: past cache '{v.name}' is not a model input")
        bad = [u.node.op_type for u in v.uses() if u.node is not gqa and u.node.op_type != "Shape"]
        if bad:
            raise UnsupportedModelError(f"{gqa.name}: past cache '{v.name}' is also read by {', '.join(bad)}")
    for v in (prk, prv):
        if id(v) not in graph_outputs or v.uses():
            raise UnsupportedModelError(f"{gqa.name}: present cache '{v.name}' is not (only) a model output")
    return pk, pv, prk, prv


def _retype(v: ir.Value, dtype: ir.DataType, last: int) -> None:
    v.dtype = dtype
    if v.shape is not None and len(v.shape) == 4:
        v.shape = ir.Shape([*list(v.shape)[:3], last])


@register_pass
class QuantizeKVCache(QCPass):
    """KV cache of fused GroupQueryAttention → int8 / packed int4 with calibrated scales (module docstring)."""

    name = "quantize-kv-cache"
    Config = KVCacheConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cfg: KVCacheConfig = self.config
        nodes = _gqa_nodes(graph)
        if not nodes:
            unfused = sum(1 for n in graph if n.op_type == "Softmax")
            raise UnsupportedModelError(
                "KV-cache quantization needs fused attention (com.microsoft.GroupQueryAttention, whose ONNX Runtime "
                f"kernel keeps the quantized cache); this graph has none ({unfused} unfused attention Softmax): "
                "drop --no-fuse, use target cpu or cuda, or see docs/families.md for families whose attention fuses")
        io = [_check_cache_io(graph, n) for n in nodes]
        for n in nodes:
            if n.attributes.get_string("k_quant_type", "NONE") != "NONE":
                raise UnsupportedModelError(f"{n.name}: its KV cache is already quantized")
        calibrate = self.context.require_calibration(self.name)
        observers = ("absmax_channel", "sample") if cfg.clip == "mse" else ("absmax_channel",)
        requests = [StatRequest(n.inputs[i].name, observers) for n in nodes for i in (1, 2)]  # type: ignore[union-attr]
        stats = calibrate(model, requests)
        dtype = ir.DataType.INT8 if cfg.bits == 8 else ir.DataType.UINT8
        report = []
        for n, (pk, pv, prk, prv) in zip(nodes, io):
            kv = n.attributes.get_int("kv_num_heads")
            scales = []
            for i, gran in ((1, cfg.k_granularity), (2, cfg.v_granularity)):
                name = n.inputs[i].name  # type: ignore[union-attr]
                rows = stats.get(name, "sample").rows if cfg.clip == "mse" else None
                scales.append(cache_scales(stats.get(name, "absmax_channel"), rows, kv, cfg.bits, gran, cfg.clip))
            head = scales[0].size // kv if cfg.k_granularity == "channel" else None
            head = head or (np.asarray(stats.get(n.inputs[1].name, "absmax_channel")).size // kv)  # type: ignore[union-attr]
            if cfg.bits == 4 and head % 2:
                raise UnsupportedModelError(f"{n.name}: int4 cache needs an even head size, got {head}")
            ks = add_initializer(graph, f"{n.name}/k_scale", scales[0])
            vs = add_initializer(graph, f"{n.name}/v_scale", scales[1])
            if len(n.inputs) < 14:
                n.resize_inputs(14)
            n.replace_input_with(12, ks)
            n.replace_input_with(13, vs)
            n.attributes["k_quant_type"] = ir.AttrString("k_quant_type", GRANULARITY[cfg.k_granularity])
            n.attributes["v_quant_type"] = ir.AttrString("v_quant_type", GRANULARITY[cfg.v_granularity])
            n.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", cfg.bits)
            last = head if cfg.bits == 8 else head // 2
            for v in (pk, pv, prk, prv):
                _retype(v, dtype, last)
            report.append({"node": n.name, "past_key": pk.name,
                           "k_scale_max": float(scales[0].max()), "v_scale_max": float(scales[1].max())})
        self.context.report["kv_cache"] = {
            "bits": cfg.bits, "dtype": "int8" if cfg.bits == 8 else "uint8 (int4 + 8, two per byte, low nibble first)",
            "k": GRANULARITY[cfg.k_granularity], "v": GRANULARITY[cfg.v_granularity], "clip": cfg.clip,
            "layers": len(nodes), "nodes": report,
        }
        log.info("quantize-kv-cache: %d GroupQueryAttention cache(s) → int%d (k %s, v %s, clip %s)", len(nodes),
                 cfg.bits, cfg.k_granularity, cfg.v_granularity, cfg.clip)
        return ir.passes.PassResult(model, modified=True)
