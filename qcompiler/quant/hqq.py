"""HQQ: data-free refinement of group zero points by half-quadratic splitting.

Half-Quadratic Quantization (Badri & Shaji, 2023) fits a group's affine grid
``Ŵ = s·(q − z)``, ``q = clamp(round(W/s + z))``, to the weights under a sparsity-promoting
loss ``‖W − Ŵ‖_p^p`` (``p < 1``).  With the scale fixed by the group's exact range (as in
HQQ), splitting with an auxiliary error ``W_e`` and penalty ``β``::

    min_z  ‖W_e‖_p^p + β/2·‖W − s·(q − z) − W_e‖²

alternates closed-form steps per group:

1. ``q = clamp(round(W/s + z))`` (the grid with the current z);
2. ``W_e = shrink_p(W − s·(q − z), β)`` with the generalized soft-threshold
   ``shrink_p(x, β) = sign(x)·max(|x| − |x|^(p−1)/β, 0)``;
3. ``z = mean(q − (W − W_e)/s)`` over the group (the least-squares zero point);
4. ``β ← κ·β``.

z is real during the iterations; the stored formats (uint4/uint8 zero points of
DequantizeLinear and MatMulNBits) need an integer, so each group keeps, among the
rounded iterates and the round-to-nearest start, the integer z with the lowest
``‖W − Ŵ‖_p^p``.  Symmetric grids have no zero point: there the scale is refined the same
way (``s = Σ T·q / Σ q²`` with ``T = W − W_e``).  The exact range is kept (no clipping: on
models whose weights came from a 4-bit grid, clipping the range costs accuracy).  No
calibration data.
"""

from __future__ import annotations

import numpy as np

from qcompiler.quant import numerics
from qcompiler.quant.numerics import (
    QuantizedWeight,
    _grouped,
    column_blocks,
    group_size_for,
    scales_from_range,
)
from qcompiler.spec import QuantSpec


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    ax = np.abs(x)
    return np.sign(x) * np.maximum(ax - np.power(np.maximum(ax, np.float32(1e-12)), np.float32(p - 1.0)) / np.float32(beta), 0)


def quantize_hqq(
    w: np.ndarray,
    spec: QuantSpec,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> QuantizedWeight:
    """HQQ refinement of ``W[K, N]``'s per-group integer zero points (symmetric: scales); see the module docstring.

    Every column's groups are independent, so a wide weight is processed in column blocks
    (:func:`qcompiler.quant.numerics.column_blocks`; same result, bounded temporaries).
    """
    k, n = w.shape
    group = group_size_for(spec, k)
    blocks = column_blocks(k, n, numerics.BLOCK_VALUES // 4)
    if len(blocks) > 1:
        parts = [quantize_hqq(w[:, sl], spec, iters, p, beta, kappa) for sl in blocks]
        zps = [part.zero_point for part in parts]
        return QuantizedWeight(np.concatenate([part.q for part in parts], axis=1),
                               np.concatenate([part.scale for part in parts], axis=1),
                               None if zps[0] is None else np.concatenate(zps, axis=1), spec, group)  # type: ignore[arg-type]
    w = np.asarray(w, dtype=np.float32)
    wd, pad = _grouped(w, group)  # [G, g, N]
    valid = np.ones(wd.shape[:2], dtype=np.float32)
    if pad:
        valid[-1, group - pad :] = 0.0
    mask = valid[:, :, None]
    cnt = valid.sum(axis=1)[:, None]  # rows per group
    scale, zp = scales_from_range(wd.min(axis=1), wd.max(axis=1), spec)
    s = scale.astype(np.float32)
    z = np.zeros_like(s) if zp is None else zp.astype(np.float32)
    lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (spec.qmin, spec.qmax)
    pw = np.float32(p)

    def grid(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(wd / s[:, None, :] + z[:, None, :]), lo, hi)

    def loss(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        res = np.abs(wd - s[:, None, :] * (grid(s, z) - z[:, None, :])) * mask
        return np.sum(np.power(res, pw), axis=1, dtype=np.float64)

    best_s, best_z, best = s.copy(), z.copy(), loss(s, z)
    zf, sf = z.copy(), s.copy()
    for _ in range(iters):
        q = grid(sf, zf)
        res = (wd - sf[:, None, :] * (q - zf[:, None, :])) * mask
        t = (wd - _shrink(res, beta, p)) * mask
        if spec.symmetric:
            den = np.einsum("gkn,gkn->gn", q * mask, q)
            s_new = np.einsum("gkn,gkn->gn", q * mask, t) / np.maximum(den, 1e-12)
            sf = np.where((den > 0) & (s_new * sf > 0), s_new, sf).astype(np.float32)  # keeps the sign
            cand_s, cand_z = sf, zf
        else:
            zf = np.clip((np.sum((q - t / sf[:, None, :]) * mask, axis=1) / cnt), lo, hi).astype(np.float32)
            cand_s, cand_z = sf, np.rint(zf)
        beta *= kappa
        cand = loss(cand_s, cand_z)
        better = cand < best
        best_s, best_z = np.where(better, cand_s, best_s), np.where(better, cand_z, best_z)
        best = np.where(better, cand, best)
    scale = numerics.store_scales(best_s.astype(np.float32), spec)  # refined scales as stored, then the codes
    q = grid(scale, best_z).reshape(-1, n)[:k]
    if spec.symmetric:
        return QuantizedWeight(q.astype(np.int8), scale, None, spec, group)
    return QuantizedWeight(q.astype(np.uint8), scale, best_z.astype(np.uint8), spec, group)
