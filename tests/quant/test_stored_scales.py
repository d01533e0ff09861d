"""Scales rounded to the graph's float type before the codes are chosen (``QuantSpec.scale_dtype``).

Codes chosen with a float32 scale and stored beside an fp16/bf16 scale are not the nearest
codes for the stored scale; with the scale rounded first, ``q = round(W / s_stored) (+ z)``
exactly, and the dequantized weight the graph computes is never further from W.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from qcompiler.models.half import to_float_type
from qcompiler.models.synthetic import SyntheticConfig, build_llama
from qcompiler.passes.quantize_weights import QuantizeWeights, QuantizeWeightsConfig

from qcompiler.pipeline import get_pass
from qcompiler.quant.emit import read_dq_weight
from qcompiler.quant.hqq import quantize_hqq
from qcompiler.quant.numerics import expand_groups, quantize_rtn
from qcompiler.spec import Granularity, QuantSpec

TYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def _weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((256, 96)).astype(np.float32) * 0.02
    w[rng.integers(0, 256, 40), rng.integers(0, 96, 40)] *= 30  # outliers: large codes, where δs matters most
    return w


def _graph_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, group: int,
                 dtype: type) -> float:
    """Σ (W − Ŵ)² with Ŵ as the graph computes it: the scale stored in ``dtype``."""
    s = expand_groups(scale.astype(dtype).astype(np.float32), group, w.shape[0])
    z = 0.0 if zp is None else expand_groups(zp.astype(np.float32), group, w.shape[0])
    return float(np.sum((w - (q.astype(np.float32) - z) * s) ** 2, dtype=np.float64))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("bits", "gran"), [(4, Granularity.GROUP), (8, Granularity.CHANNEL)])
def test_rtn_codes_are_nearest_for_the_stored_scale(name: str, sym: bool, bits: int, gran: Granularity) -> None:
    w, t = _weight(bits), TYPES[name]
    wide = QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=32)
    stored = dataclasses.replace(wide, scale_dtype=name)
    old, new = quantize_rtn(w, wide), quantize_rtn(w, stored)
    # the scale is a value of the stored type; the codes are round(W / s) (+ z) for exactly that scale
    assert np.array_equal(new.scale.astype(t).astype(np.float32), new.scale)
    s = expand_groups(new.scale, new.group_size, w.shape[0])
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    z = 0.0 if sym else expand_groups(new.zero_point.astype(np.float32), new.group_size, w.shape[0])
    assert np.array_equal(new.q.astype(np.float32), np.clip(np.rint(w / s) + z, lo, hi))
    # the weight the graph computes is no further from W than with codes chosen for the float32 scale
    e_new = _graph_error(w, new.q, new.scale, new.zero_point, new.group_size, t)
    e_old = _graph_error(w, old.q, old.scale, old.zero_point, old.group_size, t)
    assert e_new <= e_old
    if name == "bf16" and bits == 8:  # 8-bit significand, codes up to 127: up to half a step off before
        assert (old.q != new.q).any()


@pytest.mark.parametrize("name", TYPES)
def test_hqq_refined_scales_are_stored_before_the_codes(name: str) -> None:
    w, t = _weight(5), TYPES[name]
    spec = QuantSpec(bits=4, symmetric=True, group_size=32, method="hqq", scale_dtype=name)
    qw = quantize_hqq(w, spec)
    assert np.array_equal(qw.scale.astype(t).astype(np.float32), qw.scale)
    s = expand_groups(qw.scale, qw.group_size, w.shape[0])
    assert np.array_equal(qw.q.astype(np.float32), np.clip(np.rint(w / s), -8, 7))


def test_quantize_weights_on_fp16_graph_stores_the_scales_it_rounded_for() -> None:
    """The pass on an fp16 graph: every emitted DequantizeLinear holds fp16 scales and the codes
    ``round(W / s) + z`` for them, W the graph's fp16 weight."""
    proto, _ = build_llama(SyntheticConfig(kv_cache=False))
    model = ir.serde.deserialize_model(to_float_type(proto, ir.DataType.FLOAT16))
    weights = {}
    get_pass("canonicalize")()(model)
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            weights[node.name] = node.inputs[1].const_value.numpy().astype(np.float32)
    QuantizeWeights(QuantizeWeightsConfig(bits=4, group_size=32, sym=False))(model)
    checked = 0
    for node in model.graph:
        if node.name not in weights:
            continue
        dqw = read_dq_weight(node.inputs[1])
        if dqw is None:  # lm_head stays float
            continue
        assert dqw.dq.inputs[1].dtype == ir.DataType.FLOAT16
        w = weights[node.name]
        s = expand_groups(dqw.scale.astype(np.float32), dqw.group_size, w.shape[0])
        z = expand_groups(dqw.zero_point.astype(np.float32), dqw.group_size, w.shape[0])
        assert np.array_equal(dqw.q.astype(np.float32), np.clip(np.rint(w / s) + z, 0, 15)), node.name
        checked += 1
    assert checked >= 14
