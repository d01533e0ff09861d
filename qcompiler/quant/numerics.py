"""Integer grids and round-to-nearest quantization of weights.

A weight ``W[K, N]`` (``Y = X·W``, K the reduction axis) is quantized per column and
per group of ``g`` consecutive rows (``g = K`` for per-channel):

* asymmetric (uint, ``[0, 2^b−1]``): the range is widened to hold 0
  (``min ← min(min, 0)``, ``max ← max(max, 0)``), ``s = (max − min)/(2^b−1)``, ``z = round(−min/s)``,
  ``q = clamp(round(W/s) + z)``, ``Ŵ = s·(q − z)``;
* symmetric (int, ``[−2^(b−1), 2^(b−1)−1]``): ``s = max|W|/(2^(b−1)−1)``,
  ``q = clamp(round(W/s))``, ``Ŵ = s·q``;
* symmetric full range (``spec.full_range``; llama.cpp's Q4_0, ONNX Runtime's own symmetric
  blocks): with ``v`` the group's value of largest magnitude, ``s = v/−2^(b−1)`` (a *signed*
  scale), so ``v`` is code ``−2^(b−1)`` exactly and the step is ``|v|/2^(b−1)`` instead of
  ``|v|/(2^(b−1)−1)`` (int4: 8/7 finer); values of the other sign beyond ``(2^(b−1)−1)·|s|``
  clamp.  Versus the asymmetric grid, whose zero point is rounded, neither extreme of which is
  on the grid: the extreme is kept exactly.  SmolLM2's lm_head int4 g32 RTN on it instead of the
  asymmetric grid (RTN g128 decoder, fake-quantized): perplexity 59.16 → 56.72 on git's release
  notes, 15.73 → 14.87 on Python source (docs/fusion.md).

The scale is computed in float32 and then rounded to the float type it is stored in
(``spec.scale_dtype``, the graph's: :func:`store_scales`) *before* the codes are chosen, so
``q = round(W/s_stored)`` are the nearest codes for the scale the graph holds (codes chosen
with the float32 scale and stored with a rounded one are off by up to ``|q|·δs``: for fp16
``δs/s ≤ 2⁻¹¹``, for bf16 ``2⁻⁸``, i.e. up to half a step at ``|q| = 127`` in bf16).

Inside the range the error is at most ``s/2`` per element (round to nearest).  A
``clip`` ratio ``c ≤ 1`` shrinks the range (``c·min``, ``c·max``) before rounding; MSE
clipping searches ``c`` per group.  When K is not a multiple of g the last group is
shorter (formats that need whole blocks pad with zeros: see ``packing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.spec import Granularity, QuantSpec

#: Values per column block of the blockwise quantizers (16 MiB in fp32): bounds their temporaries.
BLOCK_VALUES = 1 << 22


@dataclass(frozen=True)
class QuantizedWeight:
    """``Ŵ[k, n] = scale[k // g, n] · (q[k, n] − zero_point[k // g, n])``.

    ``q`` is int8 for symmetric specs, uint8 otherwise; ``zero_point`` is None for
    symmetric specs.  ``group_size`` is K for per-channel quantization.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    spec: QuantSpec
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        return dequantize(self.q, self.scale, self.zero_point, self.group_size)


def group_size_for(spec: QuantSpec, k: int) -> int:
    return spec.group_size if spec.granularity == Granularity.GROUP else k


def expand_groups(a: np.ndarray, group: int, k: int) -> np.ndarray:
    """Repeat per-group rows ``[G, N]`` to per-row ``[K, N]``."""
    return np.repeat(a, group, axis=0)[:k]


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, group: int) -> np.ndarray:
    k = q.shape[0]
    s = expand_groups(scale.astype(np.float32), group, k)
    qf = q.astype(np.float32)
    if zero_point is not None:
        qf = qf - expand_groups(zero_point.astype(np.float32), group, k)
    return (qf * s).astype(np.float32)


def _grouped(w: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """``W[K, N]`` → ``[G, g, N]`` padded with NaN-free edge values; returns (view, pad)."""
    k, n = w.shape
    g_count = -(-k // group)
    pad = g_count * group - k
    if pad:
        # pad by repeating the group's own last rows so min/max are unaffected
        w = np.concatenate([w, np.repeat(w[-1:], pad, axis=0)], axis=0)
    return w.reshape(g_count, group, n), pad


def group_ranges(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (min, max) of ``W[K, N]``: arrays ``[G, N]``."""
    wg, _ = _grouped(w, group)
    return wg.min(axis=1), wg.max(axis=1)


def store_scales(scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``scale`` (float32) rounded to ``spec.scale_dtype`` as the graph will store it, kept as float32
    values; a nonzero scale that would round to 0 becomes the type's smallest subnormal, of its sign."""
    if spec.scale_dtype == "fp32":
        return np.asarray(scale, np.float32)
    import ml_dtypes

    t = np.float16 if spec.scale_dtype == "fp16" else ml_dtypes.bfloat16
    stored = np.asarray(scale, np.float32).astype(t).astype(np.float32)
    tiny = np.float32(ml_dtypes.finfo(t).smallest_subnormal)
    # a scale the type flushes to 0 keeps its sign (full-range symmetric scales are signed)
    return np.where((stored == 0) & (np.asarray(scale) != 0), np.copysign(tiny, scale), stored).astype(np.float32)


def scales_from_range(
    wmin: np.ndarray, wmax: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) of each group from its (possibly clipped) range; the scale as stored
    (:func:`store_scales`), the zero point for that scale."""
    if not (np.isfinite(wmin).all() and np.isfinite(wmax).all()):
        raise ValueError("non-finite weight range (NaN/Inf in the weight)")
    if spec.symmetric:
        if spec.full_range:  # the extreme of larger magnitude, sign kept, onto code -2^(b-1)
            scale = np.where(np.abs(wmin) >= np.abs(wmax), wmin, wmax) / float(-(2 ** (spec.bits - 1)))
        else:
            scale = np.maximum(np.abs(wmin), np.abs(wmax)) / float(spec.qmax)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)  # an all-zero group; NaN stays NaN
        return store_scales(scale, spec), None
    # The grid must hold 0 (z is an integer in [qmin, qmax]): a group whose values all
    # have one sign gets its range widened to 0, else its far end would be clamped.
    wmin, wmax = np.minimum(wmin, 0.0), np.maximum(wmax, 0.0)
    span = wmax - wmin
    scale = (span / float(spec.qmax - spec.qmin)).astype(np.float32)
    scale = store_scales(np.where(scale == 0, np.float32(1.0), scale).astype(np.float32), spec)  # all-zero: 1
    zp = np.clip(np.round(-wmin / scale), spec.qmin, spec.qmax).astype(np.uint8)
    return scale, zp


def quantize_with(
    w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, spec: QuantSpec, group: int
) -> np.ndarray:
    """Round ``W`` onto the grid given by per-group ``scale``/``zero_point``.

    Computed on the grouped view ``[G, g, N]`` with the ``[G, 1, N]`` scales broadcast (no
    ``[K, N]`` copy of them) and in place: ``clamp(rint(W / s) + z)``, the same float32
    operations, in the same order, as on the expanded grids.
    """
    k = w.shape[0]
    wg, _ = _grouped(np.asarray(w), group)
    return _quantize_grouped(wg, scale, zero_point, spec)[:k]


def _quantize_grouped(wg: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, spec: QuantSpec,
                      out: np.ndarray | None = None) -> np.ndarray:
    """:func:`quantize_with` on the grouped ``[G, g, N]`` weight; returns ``q[G·g, N]`` (padding rows included),
    written into ``out`` (``[G, g, N]`` or a view of that shape) when given."""
    lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (spec.qmin, spec.qmax)
    t = np.divide(wg, np.asarray(scale)[:, None, :])
    np.rint(t, out=t)
    if zero_point is not None:
        t += zero_point.astype(np.float32)[:, None, :]
    np.clip(t, lo, hi, out=t)
    if out is None:
        return t.astype(np.int8 if zero_point is None else np.uint8).reshape(-1, wg.shape[2])
    np.copyto(out, t, casting="unsafe")  # the cast into the destination: no intermediate integer array
    return out


def column_blocks(k: int, n: int, block_values: int | None = None) -> list[slice]:
    """Column slices of a ``[K, N]`` weight holding at most ``block_values`` values each (≥ 1 column)."""
    cb = max(1, (block_values or BLOCK_VALUES) // max(k, 1))
    return [slice(c, min(c + cb, n)) for c in range(0, n, cb)]


def quantize_rtn(w: np.ndarray, spec: QuantSpec, clip_ratio: np.ndarray | float = 1.0) -> QuantizedWeight:
    """Round-to-nearest with exact per-group min/max (optionally shrunk by ``clip_ratio``).

    Processed in column blocks (:func:`column_blocks`): every column's groups are independent,
    so the result is the same as on the whole matrix while the fp32 copy and the grouped
    temporaries (about 5× a block) stay bounded; ``w`` may be a memory-mapped fp16/bf16/fp32
    array, only one block of it is ever converted.  Outputs: ``q`` one byte per value, scales.
    """
    if np.ndim(w) != 2:
        raise ValueError(f"expected a 2-D weight, got shape {np.shape(w)}")
    k, n = w.shape
    group = group_size_for(spec, k)
    g_count = -(-k // group)
    q = np.empty((k, n), dtype=np.int8 if spec.symmetric else np.uint8)
    scale = np.empty((g_count, n), dtype=np.float32)
    zp = None if spec.symmetric else np.empty((g_count, n), dtype=np.uint8)
    ratio = np.asarray(clip_ratio)
    full = (k // group) * group  # whole groups: a view; a last, shorter group: its own rows (no padded copy)
    for sl in column_blocks(k, n):
        wb = np.asarray(w[:, sl], dtype=np.float32)
        cols = wb.shape[1]
        parts = [(0, full, group)] if full else []
        if full < k:
            parts.append((full, k, k - full))
        r = ratio[:, sl] if ratio.ndim == 2 else clip_ratio
        g0 = 0
        for start, stop, g in parts:
            count = (stop - start) // g
            wg = wb[start:stop].reshape(count, g, cols)
            wmin, wmax = wg.min(axis=1), wg.max(axis=1)
            rr = r[g0:g0 + count] if np.ndim(r) == 2 else r
            s, z = scales_from_range(wmin * rr, wmax * rr, spec)
            dest = q[start:stop, sl]
            if dest.flags.c_contiguous:
                _quantize_grouped(wg, s, z, spec, out=dest.reshape(count, g, cols))
            else:
                dest[...] = _quantize_grouped(wg, s, z, spec)
            scale[g0:g0 + count, sl] = s
            if zp is not None:
                zp[g0:g0 + count, sl] = z
            g0 += count
        del wb
    return QuantizedWeight(q, scale, zp, spec, group)


def mse_clip_ratios(
    w: np.ndarray, spec: QuantSpec, grid: int = 20, min_ratio: float = 0.5, norm: float = 2.4
) -> np.ndarray:
    """Per-group shrink ratio of the range minimizing ``Σ|W − Ŵ|^norm`` (grid search, by column blocks)."""
    k, n = w.shape
    blocks = column_blocks(k, n, BLOCK_VALUES // 4)
    if len(blocks) > 1:
        return np.concatenate([mse_clip_ratios(w[:, sl], spec, grid, min_ratio, norm) for sl in blocks], axis=1)
    w = np.asarray(w, dtype=np.float32)
    group = group_size_for(spec, w.shape[0])
    wg, pad = _grouped(w, group)
    wmin, wmax = wg.min(axis=1), wg.max(axis=1)
    best_err = np.full(wmin.shape, np.inf, dtype=np.float64)
    best = np.ones(wmin.shape, dtype=np.float32)
    for i in range(grid + 1):
        r = 1.0 - (1.0 - min_ratio) * i / grid
        scale, zp = scales_from_range(wmin * r, wmax * r, spec)
        s = scale[:, None, :]
        if zp is None:
            lo, hi = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
            deq = np.clip(np.rint(wg / s), lo, hi) * s
        else:
            z = zp.astype(np.float32)[:, None, :]
            deq = (np.clip(np.rint(wg / s) + z, spec.qmin, spec.qmax) - z) * s
        diff = np.abs(deq - wg)
        if pad:
            diff[-1, group - pad :, :] = 0.0
        err = (diff**norm).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, np.float32(r), best)
    return best


def quantize_weight(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """RTN with the clipping named by ``spec.clip`` (``minmax`` or ``mse``)."""
    if spec.clip == "mse":
        return quantize_rtn(w, spec, mse_clip_ratios(w, spec))
    return quantize_rtn(w, spec)
