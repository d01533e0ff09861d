"""AWQ numerics: activation-aware scales and output-aware clipping, both scored with ``H = XᵀX``.

A group of linears reading one input ``X[T, K]`` (``Y = X·W``, ``W[K, N]`` their weights
side by side) is rescaled per input channel, ``Y = (X·diag(s)⁻¹)·(diag(s)·W)``, and the
scaled weight is quantized: ``Ŵ(s) = diag(s)⁻¹·Q(diag(s)·W)``.  Salient channels (large
``mean|X|``) get ``s > 1`` and so a finer grid.  AWQ (Lin et al., 2023) searches

    s = mean|X|^α / sqrt(max·min),   α ∈ {0, 1/n, ..., (n−1)/n}

for the α minimizing the group's output error.  Over the calibration rows that error is
a quadratic form in the weight error ``Δ = W − Ŵ(s)``:

    ‖X·W − X·Ŵ(s)‖² = tr(Δᵀ·H·Δ),   H = XᵀX

so the search needs the Hessian of the input, not the rows.  Clipping likewise:
shrinking group g's range by ``r`` changes only the rows of that group, and the
error it causes is ``e_gᵀ·H_gg·e_g`` per output column (``H_gg`` the g×g diagonal block
of H; AWQ's per-group clip search ignores cross-group terms too).  The ratio with the
least error is kept per (group, column), from ``1, 1 − 1/n, ..., 1 − max_shrink``.
"""

from __future__ import annotations

import numpy as np

from qcompiler.quant.numerics import _grouped, group_size_for, quantize_rtn, scales_from_range
from qcompiler.spec import QuantSpec


def awq_scales(x_mean_abs: np.ndarray, alpha: float, eps: float = 1e-4, pow2: bool = False) -> np.ndarray:
    """``s = mean|X|^α``, normalized so that ``max(s)·min(s) = 1`` (``pow2``: rounded to powers of two)."""
    s = np.maximum(np.asarray(x_mean_abs, np.float64), eps) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    if pow2:
        s = np.exp2(np.round(np.log2(s)))
    return s.astype(np.float32)


def quadratic_error(delta: np.ndarray, h: np.ndarray) -> float:
    """``tr(Δᵀ·H·Δ)``."""
    d = np.asarray(delta, np.float32)
    return float(np.sum(d * (np.asarray(h, np.float32) @ d), dtype=np.float64))


def scaled_rtn(w: np.ndarray, s: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``diag(s)⁻¹·Q(diag(s)·W)``: the effective weight after scaling and round-to-nearest."""
    return quantize_rtn(w * s[:, None], spec).dequantize() / s[:, None]


def search_scales(
    w: np.ndarray,
    h: np.ndarray,
    x_mean_abs: np.ndarray,
    spec: QuantSpec,
    grid: int = 20,
    tie: np.ndarray | None = None,
    pow2: bool = False,
) -> tuple[np.ndarray, float, list[float]]:
    """Best per-channel scales ``s[K]`` for the weights ``W[K, N]`` read by an input with Hessian ``H``.

    ``tie[K]`` (optional) gives channels that must share one scale the same id (e.g. the
    o_proj inputs fed by one v_proj output under grouped-query attention); the mean
    ``mean|X|`` of each tie group sets its scale.  ``pow2`` rounds the scales to powers of
    two, which makes folding them exact in binary floating point (``x/s`` and ``s·w`` are
    exact, so every product ``x·w`` is unchanged).  Returns (s, α, errors by α); α = 0
    (``s = 1``, plain RTN) is always a candidate, so the result never scores worse.
    """
    w = np.asarray(w, np.float32)
    x = np.asarray(x_mean_abs, np.float64)
    if tie is not None:
        sums = np.bincount(tie, weights=x)
        counts = np.bincount(tie)
        x = (sums / np.maximum(counts, 1))[tie]
    errors: list[float] = []
    best = (np.inf, 0.0, np.ones(w.shape[0], np.float32))
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x, alpha, pow2=pow2)
        err = quadratic_error(w - scaled_rtn(w, s, spec), h)
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


def clip_ratios(
    w: np.ndarray, h: np.ndarray, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
) -> np.ndarray:
    """Per-(group, column) range shrink ``r[G, N]`` minimizing ``e_gᵀ·H_gg·e_g`` (see module docstring)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    group = group_size_for(spec, k)
    wg, pad = _grouped(w, group)  # [G, g, N]
    n_groups = wg.shape[0]
    hp = np.zeros((n_groups * group, n_groups * group), np.float32)
    hp[:k, :k] = h
    hb = np.stack([hp[i * group : (i + 1) * group, i * group : (i + 1) * group] for i in range(n_groups)])
    wmin, wmax = wg.min(axis=1), wg.max(axis=1)
    best_err = np.full((n_groups, n), np.inf)
    best = np.ones((n_groups, n), np.float32)
    lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (spec.qmin, spec.qmax)
    for i in range(round(max_shrink * grid) + 1):
        r = 1.0 - i / grid
        scale, zp = scales_from_range(wmin * r, wmax * r, spec)
        sc = scale[:, None, :]
        if zp is None:
            deq = np.clip(np.rint(wg / sc), lo, hi) * sc
        else:
            z = zp.astype(np.float32)[:, None, :]
            deq = (np.clip(np.rint(wg / sc) + z, lo, hi) - z) * sc
        e = wg - deq
        if pad:
            e[-1, group - pad :, :] = 0.0
        err = np.sum(e * np.matmul(hb, e), axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, np.float32(r), best)
    return best
