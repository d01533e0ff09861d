"""HQQ-style data-free refinement of group scales and zero points by half-quadratic splitting.

Half-Quadratic Quantization (Badri & Shaji, 2023) fits a group's affine grid
``Ŵ = s·(q − z)``, ``q = clamp(round(W/s + z))``, to the weights under a sparsity-promoting
loss ``‖W − Ŵ‖_p^p`` (``p < 1``: a few large errors cost less than many medium ones).
Splitting with an auxiliary error ``W_e`` and penalty ``β``::

    min  ‖W_e‖_p^p + β/2·‖W − Ŵ − W_e‖²

alternates closed-form steps per group:

1. ``q = clamp(round(W/s) + z)`` (the grid with the current s, z);
2. ``W_e = shrink_p(W − s·(q − z), β)`` with the generalized soft-threshold
   ``shrink_p(x, β) = sign(x)·max(|x| − |x|^(p−1)/β, 0)``;
3. least squares of the target ``T = W − W_e`` on the grid: ``T ≈ s·q + m`` per group
   (two unknowns), ``z = −m/s``; ``z`` must be an integer of the grid for the stored
   formats (uint4/uint8 zero points), so it is rounded and ``s`` re-fitted,
   ``s = Σ T·(q − z) / Σ (q − z)²`` (symmetric: ``z = 0``, only s);
4. ``β ← κ·β``.

Starting from round-to-nearest with MSE-searched ranges, each group keeps the iterate
with the lowest ``Σ|W − Ŵ|^2.4`` (the same error measure as the MSE range search), so
the result is never worse than that start by this measure.  No calibration data.
"""

from __future__ import annotations

import numpy as np

from qcompiler.quant.numerics import (
    QuantizedWeight,
    _grouped,
    group_size_for,
    mse_clip_ratios,
    scales_from_range,
)
from qcompiler.spec import QuantSpec

NORM = 2.4  # error measure for keeping the best iterate (as in mse_clip_ratios)


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
    """HQQ refinement of ``W[K, N]``'s per-group (scale, integer zero point) (see module docstring)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    group = group_size_for(spec, k)
    wg, pad = _grouped(w, group)  # [G, g, N]
    valid = np.ones(wg.shape[:2], dtype=np.float32)
    if pad:
        valid[-1, group - pad :] = 0.0
    mask = valid[:, :, None]
    r = mse_clip_ratios(w, spec)
    scale, zp = scales_from_range(wg.min(axis=1) * r, wg.max(axis=1) * r, spec)
    s = scale.astype(np.float32)
    z = np.zeros_like(s) if zp is None else zp.astype(np.float32)
    lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (spec.qmin, spec.qmax)
    wd = wg
    cnt = valid.sum(axis=1)[:, None]  # rows per group

    def grid(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(wd / s[:, None, :]) + z[:, None, :], lo, hi)

    def error(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        e = np.abs(wd - s[:, None, :] * (grid(s, z) - z[:, None, :])) * mask
        return np.sum(np.power(e, np.float32(NORM)), axis=1, dtype=np.float64)

    best_s, best_z, best_err = s.copy(), z.copy(), error(s, z)
    for _ in range(iters):
        q = grid(s, z)
        w_e = _shrink(wd - s[:, None, :] * (q - z[:, None, :]), beta, p)
        t = (wd - w_e) * mask
        qm = q * mask
        if not spec.symmetric:
            # least squares t ≈ s·q + m per (group, column), then integer z and s refit
            mq, mt = qm.sum(axis=1) / cnt, t.sum(axis=1) / cnt
            var_q = (qm * qm).sum(axis=1) / cnt - mq * mq
            cov = (qm * t).sum(axis=1) / cnt - mq * mt
            s_ls = np.where(var_q > 1e-8, cov / np.maximum(var_q, 1e-8), s)
            s_ls = np.where(s_ls > 0, s_ls, s)
            z = np.clip(np.rint(-(mt - s_ls * mq) / s_ls), lo, hi)
        qz = (q - z[:, None, :]) * mask
        den = (qz * qz).sum(axis=1)
        s_new = np.where(den > 0, (qz * t).sum(axis=1) / np.maximum(den, 1e-12), s)
        s = np.where(s_new > 0, s_new, s)
        beta *= kappa
        err = error(s, z)
        better = err < best_err
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
        best_err = np.where(better, err, best_err)
    scale = best_s.astype(np.float32)
    q = grid(scale, best_z).reshape(-1, n)[:k]
    if spec.symmetric:
        return QuantizedWeight(q.astype(np.int8), scale, None, spec, group)
    return QuantizedWeight(q.astype(np.uint8), scale, best_z.astype(np.uint8), spec, group)
