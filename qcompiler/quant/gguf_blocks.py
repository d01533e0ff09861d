"""llama.cpp's quantized blocks read as integer blocks that MatMulNBits and GatherBlockQuantized carry exactly.

Every supported GGUF type dequantizes (gguf-py's ``dequantize_blocks``, fp32) as

    w = fl(s·(u − z)) + o          per (sub-)block of ``block`` values along K

with ``u`` the stored unsigned integer, ``z`` a zero point that is the same for every
block, ``s = fl(…)`` one fp32 scale per block and ``o`` an optional fp32 offset per block
(the types with a float minimum).  The table (``s`` and ``o`` as gguf-py computes them,
``d``/``dmin``/``m`` the fp16 fields, ``sc``/``mn`` the 4- or 6-bit sub-block scales):

    type   block  ONNX bits  u                 z    s            o
    Q4_0   32     4          nibble            8    d            –
    Q4_1   32     4          nibble            0    d            m
    Q5_0   32     8          q5 + 112          128  d            –       (q5 − 16 = u − 128)
    Q5_1   32     8          q5 + 128          128  d            m
    Q8_0   32     8          int8 + 128        128  d            –
    Q2_K   16     4          q2 + 8            8    d·sc         −dmin·mn
    Q3_K   16     4          q3 + 8 (q3∈[−4,3]) 8   d·(sc − 32)  –
    Q4_K   32     4          nibble            0    d·sc         −dmin·mn
    Q5_K   32     8          q5 + 128          128  d·sc         −dmin·mn
    Q6_K   16     8          q6 + 96           128  d·sc         –       (q6 − 32 = u − 128)

``u − z`` is the very integer gguf-py multiplies by, so ``fl(s·(u − z))`` is its product
bit for bit, and adding ``o`` is its one further rounding: the decoded blocks reproduce
gguf-py's dequantization exactly in fp32.  Zero points are chosen so that 8-bit types
never need a zero-point tensor (``z = 128`` is MatMulNBits' default), nor 4-bit types
with a signed grid (``z = 8``); only the unsigned 4-bit grids (Q4_1, Q4_K) store ``z = 0``.
A type whose values need 5 or 6 bits widens to 8 (MatMulNBits has 2/4/8 bits), 2- and 3-bit
grids widen to 4 (the width whose fast CPU kernel was measured), and an 8-bit grid is carried as two exact 4-bit planes
(:func:`pack_planes`), at the size cost listed by :func:`onnx_bits_per_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
T = GGMLQuantizationType


@dataclass(frozen=True)
class BlockForm:
    """How one GGUF type maps to MatMulNBits: ``bits``, ``block`` size, constant zero point, offsets or not."""

    bits: int
    block: int
    zero_point: int
    has_offset: bool


FORMS: dict[GGMLQuantizationType, BlockForm] = {
    T.Q4_0: BlockForm(4, 32, 8, False),
    T.Q4_1: BlockForm(4, 32, 0, True),
    T.Q5_0: BlockForm(8, 32, 128, False),
    T.Q5_1: BlockForm(8, 32, 128, True),
    T.Q8_0: BlockForm(8, 32, 128, False),
    T.Q2_K: BlockForm(4, 16, 8, True),
    T.Q3_K: BlockForm(4, 16, 8, False),
    T.Q4_K: BlockForm(4, 32, 0, True),
    T.Q5_K: BlockForm(8, 32, 128, True),
    T.Q6_K: BlockForm(8, 16, 128, False),
}


@dataclass(frozen=True)
class IntBlocks:
    """A GGUF weight ``W[N, K]`` (rows = output channels) as ``u[N, K]``, ``scale``/``offset [N, K/block]``."""

    u: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, K/block]
    offset: np.ndarray | None  # float32 [N, K/block]
    form: BlockForm
    gguf_type: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """fp32 ``W[N, K]`` = fl(s·(u − z)) + o, the same operations as gguf-py."""
        n, k = self.u.shape
        b = self.form.block
        q = (self.u.astype(np.int16) - self.form.zero_point).astype(np.float32).reshape(n, k // b, b)
        w = self.scale[:, :, None] * q
        if self.offset is not None:
            w = w + self.offset[:, :, None]
        return w.reshape(n, k)

    def permute_rows(self, perm: np.ndarray) -> IntBlocks:
        """Rows (output channels) reordered: ``W'[i] = W[perm[i]]`` — blocks run along K, so they move whole."""
        off = None if self.offset is None else self.offset[perm]
        return IntBlocks(self.u[perm], self.scale[perm], off, self.form, self.gguf_type)


def supported(qtype: GGMLQuantizationType) -> bool:
    return qtype in FORMS


def gguf_bits_per_weight(qtype: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def onnx_bits_per_weight(form: BlockForm, split_8bit: bool = True) -> float:
    """Bits per weight in the ONNX form: values, fp32 scales and packed zero points where stored,
    per plane (:func:`pack_planes`), and fp32 offsets."""
    if form.bits == 8 and not split_8bit:
        return 8 + 32 / form.block + (32 / form.block if form.has_offset else 0.0)
    if form.bits == 8:  # hi plane (scales), lo plane (scales, zero points 0)
        return 8 + 2 * 32 / form.block + 4 / form.block + (32 / form.block if form.has_offset else 0.0)
    zp = 4 / form.block if form.zero_point != 8 else 0.0
    return 4 + 32 / form.block + zp + (32 / form.block if form.has_offset else 0.0)


# ----------------------------------------------------------------------------- decoders
# Each takes the raw blocks [n_blocks, type_size] (uint8) and returns (u [n_blocks, values],
# scale [n_blocks, subblocks], offset [n_blocks, subblocks] | None), mirroring gguf-py.


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """``qs [n, …, half]`` → low nibbles then high nibbles along the last axis (llama.cpp's order)."""
    lo, hi = qs & np.uint8(0x0F), qs >> np.uint8(4)
    return np.concatenate([lo, hi], axis=-1)


def _bits_le(b: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` bits of each row of bytes ``b [n, count/8]``, little-endian, as uint8 0/1."""
    return np.unpackbits(b, axis=-1, bitorder="little")[:, :count]


def _q4_0(b: np.ndarray):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    return _nibbles(qs, 16), d, None


def _q4_1(b: np.ndarray):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return _nibbles(qs, 16), d, m


def _q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return _nibbles(qs, 16) | (_bits_le(qh, 32) << np.uint8(4))


def _q5_0(b: np.ndarray):
    d = _f16(b[:, :2])
    return _q5(b[:, 2:6], b[:, 6:]) + np.uint8(112), d, None


def _q5_1(b: np.ndarray):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _q5(b[:, 4:8], b[:, 8:]) + np.uint8(128), d, m


def _q8_0(b: np.ndarray):
    d = _f16(b[:, :2])
    return (np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, None


def _q2_k(b: np.ndarray):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = d * (scales & 0xF).astype(np.float32)
    ml = dmin * (scales >> 4).astype(np.float32)
    shift = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> shift) & np.uint8(3)).reshape(n, QK_K)
    return q + np.uint8(8), dl, -ml


def _q3_k(b: np.ndarray):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lsc = (scales[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hsc = (scales[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((lsc & np.uint8(0x0F)) | ((hsc & np.uint8(0x03)) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = d * sc.astype(np.float32)
    ql = (qs.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    qh = (hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & np.uint8(1)
    q = ql.reshape(n, QK_K).astype(np.int8) - ((qh.reshape(n, QK_K) ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
    return (q + np.int8(8)).astype(np.uint8), dl, None


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(n, 8)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(n, 8)
    return sc, mn


def _q4_k(b: np.ndarray):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32), 32).reshape(n, QK_K)
    return q, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _q5_k(b: np.ndarray):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _nibbles(qs.reshape(n, 4, 32), 32).reshape(n, 8, 32)
    hb = ((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1))
    q = (ql | (hb << np.uint8(4))).reshape(n, QK_K)
    return q + np.uint8(128), d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _q6_k(b: np.ndarray):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    lo = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    hi = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(0x03)
    q = lo.reshape(n, -1, 32) | (hi.reshape(n, -1, 32) << np.uint8(4))
    return q.reshape(n, QK_K) + np.uint8(96), d * scales, None


_DECODERS = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def decode(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> IntBlocks:
    """Decode a GGUF tensor's raw bytes (``[N, bytes per row]``) of logical shape ``(N, K)``."""
    if qtype not in _DECODERS:
        raise ValueError(f"GGUF type {qtype.name} has no exact MatMulNBits form")
    n, k = shape
    gblock, size = GGML_QUANT_SIZES[qtype]
    if k % gblock:
        raise ValueError(f"K={k} is not a multiple of {qtype.name}'s block of {gblock}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * (k // gblock), size)
    u, scale, offset = _DECODERS[qtype](blocks)
    form = FORMS[qtype]
    nsub = k // form.block
    return IntBlocks(
        u=np.ascontiguousarray(u.reshape(n, k).astype(np.uint8)),
        scale=np.ascontiguousarray(scale.reshape(n, nsub).astype(np.float32)),
        offset=None if offset is None else np.ascontiguousarray(offset.reshape(n, nsub).astype(np.float32)),
        form=form,
        gguf_type=qtype.name,
    )


@dataclass(frozen=True)
class Plane:
    """One MatMulNBits weight: ``B[N, K/block, block·bits/8]``, ``scales[N·K/block]``, packed ``zero_points`` or
    None (the implicit ``2^(bits−1)``); ``suffix`` names it (``""``, ``".hi"``, ``".lo"``)."""

    suffix: str
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int = 4


def _nibble_plane(suffix: str, u4: np.ndarray, scale: np.ndarray, zero_point: int, block: int) -> Plane:
    n, k = u4.shape
    nb = k // block
    u = u4.reshape(n, nb, block)
    packed = ((u[..., 0::2] & 0x0F) | (u[..., 1::2] << 4)).astype(np.uint8)
    zps = None if zero_point == 8 else np.full(n * -(-nb // 2), zero_point * 0x11, dtype=np.uint8)
    return Plane(suffix, packed, np.ascontiguousarray(scale, dtype=np.float32).reshape(-1), zps)


def pack_planes(blocks: IntBlocks, split_8bit: bool = True) -> list[Plane]:
    """The blocks as MatMulNBits weights whose sum is ``s·(u − z)`` exactly.

    ``split_8bit=False`` keeps an 8-bit grid as one 8-bit plane (``z = 128`` implicit): the form
    for ``accuracy_level=4``, where ONNX Runtime's 8-bit kernel is fast (int8 activations).

    4-bit forms are one plane.  8-bit forms (``z = 128``) are two, because ONNX Runtime 1.32's
    8-bit MatMulNBits has no fast fp32 path on CPU (``accuracy_level`` 0–3 dequantize the whole
    weight on every call: ~0.5 s for SmolLM2's 49152 × 576 lm_head vs ~10 ms at 4 bits)::

        s·(u − 128) = 16s·(hi − 8) + s·(lo − 0),   hi = u >> 4, lo = u & 15

    Both products are exact (``16s`` is ``s`` times a power of two; ``s·int`` with |int| < 2⁸
    needs at most 19 of fp32's 24 mantissa bits for an fp16-derived ``s``), and so is their sum,
    an integer multiple of ``s`` of the same size.  Row n of each ``B`` is output channel n: the
    layout GatherBlockQuantized reads as ``data[N, K/2]``.
    """
    form = blocks.form
    if form.bits == 4:
        return [_nibble_plane("", blocks.u, blocks.scale, form.zero_point, form.block)]
    if not split_8bit:
        return [Plane("", blocks.u.reshape(blocks.u.shape[0], -1, form.block).copy(),
                      blocks.scale.reshape(-1).copy(), None, bits=8)]
    if form.zero_point != 128:
        raise ValueError(f"8-bit blocks with zero point {form.zero_point} have no two-plane form")
    return [_nibble_plane(".hi", blocks.u >> 4, blocks.scale * np.float32(16), 8, form.block),
            _nibble_plane(".lo", blocks.u & 0x0F, blocks.scale, 0, form.block)]
