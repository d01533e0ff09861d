"""Packed layouts of quantized weights.

**MatMulNBits** (``com.microsoft``, ONNX Runtime): for ``Y = A·Ŵ`` with ``Ŵ[K, N]``,
block size ``B`` (a power of two ≥ 16) and ``nb = ceil(K/B)`` blocks per column:

* ``B_packed[N, nb, B·bits/8]`` uint8 — column-major: column ``n``'s quantized values
  ``q[0..K)`` padded to ``nb·B`` with the block's zero point, two 4-bit values a byte
  (element ``2i`` in the low nibble, ``2i+1`` in the high nibble);
* ``scales[N·nb]`` (column-major, A's float type);
* ``zero_points[N·ceil(nb·bits/8)]`` uint8, packed like B (absent → ``2^(bits−1)``).

Symmetric int4 ``q ∈ [−8, 7]`` is stored as ``q + 8`` with no zero points.

**Block DequantizeLinear** (opset 21): ``Ŵ = (q − z)·s`` with ``q[K, N]`` int4/uint4,
``axis=0``, ``block_size=B``, ``s, z [ceil(K/B), N]``.
"""

from __future__ import annotations

import numpy as np


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Pack the last axis (even length) of uint values < 16 into bytes, low nibble first."""
    u = u.astype(np.uint8, copy=False)
    hi = u[..., 1::2] << 4  # a new array: the high nibble (bits above 4 shift out of the byte)
    hi |= u[..., 0::2] & 0x0F
    return hi


def _pack_rows(u: np.ndarray) -> np.ndarray:
    """Pack rows ``2i`` (low nibble) and ``2i+1`` (high nibble) of ``u[K, N]`` (K even) into ``[K/2, N]`` bytes."""
    hi = u[1::2] << 4
    hi |= u[0::2] & 0x0F
    return hi


def _unpack_nibbles(p: np.ndarray) -> np.ndarray:
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def to_unsigned(q: np.ndarray, zero_point: np.ndarray | None, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Symmetric int q → unsigned ``q + 2^(bits−1)`` with the implicit zero point."""
    if zero_point is not None:
        return q.astype(np.uint8, copy=False), zero_point.astype(np.uint8, copy=False)
    offset = 2 ** (bits - 1)
    return (q.astype(np.int16) + offset).astype(np.uint8), None


def pack_matmulnbits(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    bits: int,
    block_size: int,
    group_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pack ``q[K, N]`` (per-group ``scale``/``zero_point [G, N]``) for MatMulNBits.

    ``group_size`` is the quantization group (defaults to ``block_size``); a larger
    ``block_size`` is only allowed for per-channel weights (``G == 1``), where the one
    scale is repeated over the blocks.  Returns ``(B, scales, zero_points)``.
    """
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits packing supports 4 and 8 bits, got {bits}")
    k, n = q.shape
    group_size = group_size or block_size
    nb = -(-k // block_size)
    uq, uzp = to_unsigned(q, zero_point, bits)
    if group_size != block_size:
        if scale.shape[0] != 1:
            raise ValueError("block size differs from the group size of a grouped weight")
        scale = np.repeat(scale, nb, axis=0)
        uzp = None if uzp is None else np.repeat(uzp, nb, axis=0)
    if scale.shape[0] != nb:
        raise ValueError(f"expected {nb} groups of {block_size} for K={k}, got {scale.shape[0]}")
    pad = nb * block_size - k
    if pad:
        fill = np.full((pad, n), 2 ** (bits - 1), dtype=np.uint8)
        if uzp is not None:
            fill[:] = uzp[-1:, :]
        uq = np.concatenate([uq, fill], axis=0)
    if bits == 4:  # pair rows 2i, 2i+1 first, then transpose: half the bytes go through the strided copy
        packed = np.ascontiguousarray(_pack_rows(uq).T).reshape(n, nb, block_size // 2)
    else:
        packed = np.ascontiguousarray(uq.T).reshape(n, nb, block_size).astype(np.uint8, copy=False)
    scales = np.ascontiguousarray(scale.T).reshape(-1)
    zps = None
    if uzp is not None:
        zcols = np.ascontiguousarray(uzp.T)  # [N, nb]
        if bits == 4:
            if nb % 2:
                zcols = np.concatenate([zcols, np.full((n, 1), 8, dtype=np.uint8)], axis=1)
            zps = _pack_nibbles(zcols).reshape(-1)
        else:
            zps = zcols.reshape(-1)
    return packed, scales, zps


def unpack_matmulnbits(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int, block_size: int
) -> np.ndarray:
    """Dequantize MatMulNBits inputs back to ``Ŵ[K, N]`` float32 (numpy reference)."""
    nb = -(-k // block_size)
    cols = _unpack_nibbles(packed) if bits == 4 else packed
    cols = cols.reshape(n, nb, block_size).astype(np.float32)
    s = scales.reshape(n, nb).astype(np.float32)
    if zero_points is None:
        z = np.full((n, nb), 2 ** (bits - 1), dtype=np.float32)
    elif bits == 4:
        z = _unpack_nibbles(zero_points.reshape(n, -1))[:, :nb].astype(np.float32)
    else:
        z = zero_points.reshape(n, nb).astype(np.float32)
    w = (cols - z[:, :, None]) * s[:, :, None]
    return np.ascontiguousarray(w.reshape(n, nb * block_size)[:, :k].T)


def matmulnbits_block_size(group_size: int, k: int, bits: int = 4) -> int:
    """Block size for MatMulNBits: the group size; per channel, the power of two ≥ 16 storing a column
    in the fewest bytes (K padded to whole blocks vs. the one scale and zero point repeated per block),
    e.g. 64 for K = 576 (9 blocks, no padding) rather than 1024 (448 rows of padding)."""
    if group_size < k:
        return group_size
    best_bytes, best, b = float("inf"), 16, 16
    while True:
        nb = -(-k // b)
        size = nb * b * bits / 8 + nb * (4 + bits / 8)
        if size < best_bytes:
            best_bytes, best = size, b
        if b >= k:
            return best
        b *= 2
