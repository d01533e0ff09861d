"""MatMulNBits packing and RTN numerics against numpy references."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.quant.numerics import dequantize, quantize_rtn
from qcompiler.quant.packing import matmulnbits_block_size, pack_matmulnbits, unpack_matmulnbits
from qcompiler.spec import Granularity, QuantSpec


def _spec(bits: int, sym: bool, group: int) -> QuantSpec:
    if group == 0:
        return QuantSpec(bits=bits, symmetric=sym, granularity=Granularity.CHANNEL)
    return QuantSpec(bits=bits, symmetric=sym, granularity=Granularity.GROUP, group_size=group)


def _reference_pack(q_unsigned: np.ndarray, block: int) -> np.ndarray:
    """Straightforward loop reference of MatMulNBits' 4-bit B layout."""
    k, n = q_unsigned.shape
    nb = -(-k // block)
    out = np.zeros((n, nb, block // 2), dtype=np.uint8)
    for col in range(n):
        for b in range(nb):
            for i in range(block // 2):
                k0, k1 = b * block + 2 * i, b * block + 2 * i + 1
                lo = q_unsigned[k0, col] if k0 < k else 8
                hi = q_unsigned[k1, col] if k1 < k else 8
                out[col, b, i] = (lo & 0xF) | ((hi & 0xF) << 4)
    return out


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 0])
@pytest.mark.parametrize("k", [64, 96, 100, 576])
def test_pack_roundtrip(sym: bool, group: int, k: int) -> None:
    rng = np.random.default_rng(k + group)
    n = 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize_rtn(w, _spec(4, sym, group))
    block = matmulnbits_block_size(qw.group_size, k)
    packed, scales, zps = pack_matmulnbits(qw.q, qw.scale, qw.zero_point, 4, block, qw.group_size)
    nb = -(-k // block)
    assert packed.shape == (n, nb, block // 2)
    assert scales.shape == (n * nb,)
    back = unpack_matmulnbits(packed, scales, zps, k, n, 4, block)
    np.testing.assert_allclose(back, qw.dequantize(), rtol=0, atol=1e-6)
    if not sym and qw.group_size == block:
        qu = qw.q.astype(np.uint8)
        if k % block:  # padding holds the last group's zero point, reference pads with 8: compare real rows
            ref = _reference_pack(np.concatenate([qu, np.repeat(qw.zero_point[-1:], nb * block - k, 0)]), block)
        else:
            ref = _reference_pack(qu, block)
        np.testing.assert_array_equal(packed, ref)


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_within_half_step(sym: bool) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((200, 33)).astype(np.float32)
    qw = quantize_rtn(w, _spec(4, sym, 64))
    step = np.repeat(qw.scale, 64, axis=0)[:200]
    err = np.abs(qw.dequantize() - w)
    assert np.all(err <= step / 2 + 1e-6)
    lo, hi = (-8, 7) if sym else (0, 15)
    assert qw.q.min() >= lo and qw.q.max() <= hi


def test_rtn_exact_minmax_endpoints() -> None:
    """Asymmetric RTN with exact min/max keeps each group's extremes within half a step, 8 bits nearly exact."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 8)).astype(np.float32) * 3
    qw = quantize_rtn(w, _spec(8, False, 128))
    np.testing.assert_allclose(qw.dequantize(), w, atol=float(qw.scale.max()) / 2 + 1e-6)
    assert dequantize(qw.q, qw.scale, qw.zero_point, 128).shape == w.shape


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,group,k", [(4, 32, 96), (4, 128, 576), (4, 0, 576), (8, 64, 100), (8, 0, 64)])
def test_matmulnbits_in_onnxruntime(sym: bool, bits: int, group: int, k: int) -> None:
    """ORT's MatMulNBits on our packing equals X @ Ŵ computed in numpy."""
    rng = np.random.default_rng(3)
    n = 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize_rtn(w, _spec(bits, sym, group))
    block = matmulnbits_block_size(qw.group_size, k)
    packed, scales, zps = pack_matmulnbits(qw.q, qw.scale, qw.zero_point, bits, block, qw.group_size)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S"]
    if zps is not None:
        inits.append(numpy_helper.from_array(zps, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, k)).astype(np.float32)
    y = sess.run(None, {"A": a})[0]
    ref = a @ qw.dequantize()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
