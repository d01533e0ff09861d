"""The vectorised RTN and packing give the bytes of the plain formulas (expanded grids, column-major nibbles)."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.irutil import SpillStore
from qcompiler.quant.numerics import group_size_for, mse_clip_ratios, quantize_rtn
from qcompiler.quant.packing import pack_matmulnbits, unpack_matmulnbits
from qcompiler.spec import Granularity, QuantSpec


def _reference_rtn(w: np.ndarray, spec: QuantSpec, ratio: np.ndarray | float = 1.0):
    """RTN on expanded [K, N] grids, row group by row group (the textbook form)."""
    k = w.shape[0]
    g = group_size_for(spec, k)
    qs, ss, zs = [], [], []
    for i, start in enumerate(range(0, k, g)):
        blk = w[start:start + g].astype(np.float32)
        r = ratio[i] if np.ndim(ratio) == 2 else ratio
        lo, hi = blk.min(axis=0) * r, blk.max(axis=0) * r
        if spec.symmetric:
            s = (np.maximum(np.abs(lo), np.abs(hi)) / float(spec.qmax))
            s = np.where(s == 0, 1.0, s).astype(np.float32)
            q = np.clip(np.rint(blk / s), -8, 7).astype(np.int8)
            z = None
        else:
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
            s = ((hi - lo) / float(spec.qmax - spec.qmin)).astype(np.float32)
            s = np.where(s == 0, np.float32(1.0), s).astype(np.float32)
            z = np.clip(np.round(-lo / s), spec.qmin, spec.qmax).astype(np.uint8)
            q = np.clip(np.rint(blk / s) + z.astype(np.float32), spec.qmin, spec.qmax).astype(np.uint8)
        qs.append(q)
        ss.append(s)
        zs.append(z)
    return np.concatenate(qs), np.stack(ss), None if spec.symmetric else np.stack(zs)


@pytest.mark.parametrize("shape", [(576, 96), (1536, 40), (100, 7), (130, 5)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 128, 0])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_rtn_bytes_equal_the_plain_formula(shape: tuple[int, int], sym: bool, group: int, clip: str) -> None:
    rng = np.random.default_rng(sum(shape) + group)
    w = rng.standard_normal(shape).astype(np.float32)
    w[:, 1] = np.abs(w[:, 1])  # one-signed column: the range widened to 0
    w[:, 2] = 0.0  # an all-zero column
    spec = QuantSpec(bits=4, symmetric=sym, granularity=Granularity.GROUP if group else Granularity.CHANNEL,
                     group_size=group or 128, clip=clip)
    ratio = mse_clip_ratios(w, spec) if clip == "mse" else 1.0
    qw = quantize_rtn(w, spec, ratio)
    q, s, z = _reference_rtn(w, spec, ratio)
    assert qw.q.tobytes() == q.tobytes()
    assert qw.scale.tobytes() == s.tobytes()
    assert (qw.zero_point is None) == (z is None)
    if z is not None:
        assert qw.zero_point.tobytes() == z.tobytes()


@pytest.mark.parametrize("k,n,block", [(576, 24, 128), (512, 8, 32), (100, 3, 32)])
def test_packing_matches_column_major_nibbles(k: int, n: int, block: int) -> None:
    """B[n, b, j] holds q[b·B + 2j, n] (low nibble) and q[b·B + 2j + 1, n] (high), K padded with the zero point."""
    rng = np.random.default_rng(k)
    nb = -(-k // block)
    q = rng.integers(0, 16, (k, n), dtype=np.uint8)
    z = rng.integers(0, 16, (nb, n), dtype=np.uint8)
    s = rng.random((nb, n), dtype=np.float32) + 0.1
    packed, scales, zps = pack_matmulnbits(q, s, z, 4, block)
    full = np.concatenate([q, np.repeat(z[-1:], nb * block - k, axis=0)])
    cols = full.T.reshape(n, nb, block)
    assert packed.tobytes() == ((cols[..., 0::2] & 0x0F) | (cols[..., 1::2] << 4)).astype(np.uint8).tobytes()
    w = unpack_matmulnbits(packed, scales, zps, k, n, 4, block)
    deq = (q.astype(np.float32) - np.repeat(z, block, axis=0)[:k]) * np.repeat(s, block, axis=0)[:k]
    np.testing.assert_allclose(w, deq, rtol=0, atol=0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("size", [(64, 33), (7, 3)])
def test_spilled_int4_reads_back(tmp_path, signed: bool, size: tuple[int, int]) -> None:
    """The spill store's own 4-bit packing reads back as the values written (odd element counts too)."""
    import onnx_ir as ir

    rng = np.random.default_rng(1)
    vals = rng.integers(-8, 8, size).astype(np.int8) if signed else rng.integers(0, 16, size).astype(np.uint8)
    t = ir.Tensor(vals, dtype=ir.DataType.INT4 if signed else ir.DataType.UINT4)
    store = SpillStore(tmp_path, min_bytes=1)
    spilled = store.spill(t, "w")
    assert spilled is not t
    np.testing.assert_array_equal(spilled.numpy(), vals)
    assert spilled.tobytes() == t.tobytes()  # the same bytes as onnx_ir's packing
    store.close()
