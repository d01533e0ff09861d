"""GPTQ: quantize a weight column by column, pushing each rounding error onto the columns not yet quantized.

For a linear ``Y = X·W`` (``W[K, N]``) and calibration inputs ``X``, the output error
of a quantized ``Ŵ`` is ``‖X(W − Ŵ)‖² = Σ_n (w_n − ŵ_n)ᵀ H (w_n − ŵ_n)`` with
``H = XᵀX``: one quadratic form per output column, all sharing ``H``.  GPTQ (Frantar
et al., 2022, after Optimal Brain Quantization) rounds input row ``k`` of ``W`` to the
grid, then updates the rows after it to absorb the error optimally:

    δ = (w_k − q(w_k)) / [H⁻¹]_kk,      w_j ← w_j − δ·[H⁻¹]_kj   (j > k)

with ``H⁻¹`` taken as the upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (so removing
row k from the problem is reading row k of U).  ``λ = damp·mean(diag H)`` (damping);
inputs never seen (``H_kk = 0``) get ``H_kk = 1`` and ``w_k = 0``.  Updates are applied
lazily per block of ``B`` rows: within the block row by row, to the rest of ``W`` once
per block (``W[i2:] −= Uᵀ[i1:i2, i2:]·Δ``), which is the same arithmetic in big GEMMs.

**act-order** quantizes rows in order of decreasing ``H_kk`` (most-used inputs first,
while the most freedom is left).  With groups, it uses **static groups**: each group's
scale and zero point are computed from the original weights of the contiguous rows
``[g·G, (g+1)·G)`` before any update, so the result is exactly the group-wise format that
MatMulNBits and block ``DequantizeLinear`` store (groups contiguous along K).
Without act-order, a group's parameters are computed when its first row comes up, from
the already-updated weights (the original GPTQ).  ``clip="mse"`` shrinks each group's
range by the MSE grid search of :func:`qcompiler.quant.numerics.mse_clip_ratios`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from qcompiler.quant.numerics import (
    QuantizedWeight,
    group_ranges,
    group_size_for,
    mse_clip_ratios,
    scales_from_range,
)
from qcompiler.spec import Granularity, QuantSpec

log = logging.getLogger(__name__)


def _group_params(cols: np.ndarray, spec: QuantSpec, clip: str,
                  ratio: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) ``[N]`` of one group from its rows ``cols[g, N]`` (range × ``ratio`` if given)."""
    one = dataclasses.replace(spec, granularity=Granularity.CHANNEL)
    wmin, wmax = group_ranges(cols, cols.shape[0])
    if ratio is not None:
        wmin, wmax = wmin * ratio, wmax * ratio
    elif clip == "mse":
        r = mse_clip_ratios(cols, one)
        wmin, wmax = wmin * r, wmax * r
    scale, zp = scales_from_range(wmin, wmax, spec)
    return scale[0], None if zp is None else zp[0]


def _grid(spec: QuantSpec) -> tuple[int, int]:
    if spec.symmetric:
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return spec.qmin, spec.qmax


def inverse_hessian_factor(h: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp·mean(diag H)`` (raised ×10 until H is PD)."""
    h = np.array(h, dtype=np.float64)
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    for attempt in range(6):
        lam = damp * (10.0**attempt) * mean_diag
        hd = h.copy()
        hd[np.diag_indices_from(hd)] += lam
        try:
            c = scipy.linalg.cholesky(hd, lower=False, check_finite=False)
            hinv, info = scipy.linalg.lapack.dpotri(c, lower=0)  # (UᵀU)⁻¹ from U, upper triangle
            if info != 0:
                raise np.linalg.LinAlgError(f"potri failed ({info})")
            hinv = np.triu(hinv) + np.triu(hinv, 1).T
            return scipy.linalg.cholesky(hinv, lower=False, check_finite=False), lam
        except np.linalg.LinAlgError:
            log.debug("gptq: H + %.3g·I is not positive definite; raising the damping", lam)
    raise np.linalg.LinAlgError("the Hessian stays singular after damping ×1e5")


def gptq_quantize(
    w: np.ndarray,
    xtx: np.ndarray,
    spec: QuantSpec,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    clip: str = "minmax",
    ratios: np.ndarray | None = None,
) -> QuantizedWeight:
    """GPTQ of ``W[K, N]`` given ``XᵀX[K, K]`` of its calibration inputs (see the module docstring).

    ``ratios[G, N]`` (optional) shrink each static group's range (e.g. AWQ's output-aware
    clipping) and imply static groups.  BLAS runs single-threaded here: the work is many
    small triangular and rank-1 updates, which a second BLAS thread slows down (and much
    more so on a busy machine).
    """
    with threadpool_limits(1, user_api="blas"):
        return _gptq(w, xtx, spec, act_order=act_order, damp=damp, block=block, clip=clip, ratios=ratios)[0]


def gptq_with_start(
    w: np.ndarray,
    xtx: np.ndarray,
    spec: QuantSpec,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[QuantizedWeight, np.ndarray]:
    """GPTQ with static groups (minmax ranges of ``W``, with or without act-order) and the weights it rounded.

    The second result ``W̃[K, N]`` holds each row ``w̃_k`` as it was when GPTQ rounded it (the
    original row plus the error feedback of the rows before it), so
    ``q = clamp(⌊W̃/s⌉ + z)`` on the returned grid: the starting point of learned rounding
    around GPTQ's solution (``round{init=gptq}``).
    """
    with threadpool_limits(1, user_api="blas"):
        qw, start = _gptq(w, xtx, spec, act_order=act_order, damp=damp, block=block, clip="minmax", ratios=None,
                          static_groups=True, keep_start=True)
        assert start is not None
        return qw, start


def _gptq(
    w: np.ndarray,
    xtx: np.ndarray,
    spec: QuantSpec,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    clip: str = "minmax",
    ratios: np.ndarray | None = None,
    static_groups: bool = False,
    keep_start: bool = False,
) -> tuple[QuantizedWeight, np.ndarray | None]:
    wk = np.array(w, dtype=np.float32)  # [K, N]: row k = input channel k (GPTQ's column k)
    k, n = wk.shape
    if xtx.shape != (k, k):
        raise ValueError(f"Hessian shape {xtx.shape} does not match the weight's K = {k}")
    h = np.array(xtx, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    wk[dead, :] = 0.0
    group = group_size_for(spec, k)
    n_groups = -(-k // group)
    lo, hi = _grid(spec)
    scales = np.zeros((n_groups, n), dtype=np.float32)
    zps = None if spec.symmetric else np.zeros((n_groups, n), dtype=np.float32)
    static = static_groups or act_order or group >= k or ratios is not None
    if static:
        for g in range(n_groups):
            s, z = _group_params(wk[g * group : (g + 1) * group], spec, clip, None if ratios is None else ratios[g])
            scales[g] = s
            if zps is not None:
                zps[g] = z
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wk = wk[perm]
    h = h[np.ix_(perm, perm)]
    u, _ = inverse_hessian_factor(h, damp)
    u = u.astype(np.float32)
    q = np.zeros((k, n), dtype=np.float32)
    # each row as it was rounded (after the feedback before it): a second K×N array, kept only when asked for
    rounded = np.zeros((k, n), dtype=np.float32) if keep_start else None
    block = max(1, block)
    if not static and block % group and group % block:
        block = group  # group starts must fall on block starts or inside a block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wk[i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            g = perm[row] // group
            if not static and row % group == 0:
                src = w1[i : i + group] if row + group <= i2 else wk[row : row + group]
                s, z = _group_params(src, spec, clip)
                scales[g] = s
                if zps is not None:
                    zps[g] = z
            s = scales[g]
            x = w1[i]
            if rounded is not None:
                rounded[row] = x
            if zps is None:
                qi = np.clip(np.rint(x / s), lo, hi)
                deq = qi * s
            else:
                qi = np.clip(np.rint(x / s) + zps[g], lo, hi)
                deq = (qi - zps[g]) * s
            q[row] = qi
            e = (x - deq) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], e)
            err1[i] = e
        wk[i2:] -= u[i1:i2, i2:].T @ err1
    inverse = np.argsort(perm)
    q_kn = q[inverse]
    q_kn = q_kn.astype(np.int8) if spec.symmetric else q_kn.astype(np.uint8)
    zp = None if zps is None else zps.astype(np.uint8)
    start = None if rounded is None else np.ascontiguousarray(rounded[inverse])
    return QuantizedWeight(np.ascontiguousarray(q_kn), scales, zp, spec, group), start


def output_error(w: np.ndarray, w_hat: np.ndarray, xtx: np.ndarray) -> float:
    """Relative output error ``tr(ΔᵀHΔ) / tr(WᵀHW)`` of ``Ŵ`` for ``H = XᵀX`` (``Δ = W − Ŵ``)."""
    w = np.asarray(w, np.float32)
    d = w - np.asarray(w_hat, np.float32)
    h = np.asarray(xtx, np.float32)
    num = float(np.sum(d * (h @ d), dtype=np.float64))
    den = float(np.sum(w * (h @ w), dtype=np.float64))
    return num / max(den, 1e-30)
