"""Numerics of the SmoothQuant search: smoothing factors and the fake-quantized group error.

``s_j = max|X_j|^α / max|W_j|^(1−α)`` (optionally rounded to powers of two, exact in binary
floating point); the error of a group of linears reading ``X`` when X is smoothed by ``s``
and both sides are fake-quantized to int8 — W symmetric per output column, X per token or
static per tensor (optionally with each row's range taken from the other calibration
windows: :func:`loo_ranges`).  Used by the ``smooth-scale`` pass.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-5


def smoothing_scales(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, pow2: bool = False) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` (channels that are zero on either side keep ``s_j = 1``).

    With ``pow2`` each ``s_j`` is rounded to the nearest power of two (in log scale), so that
    ``x/s`` and ``s·w`` are exact in binary floating point and the products ``x_j·w_j`` unchanged.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    for what, arr in (("activation abs-max statistics", a), ("weight abs-max", w)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:  # never let a fallback below turn a NaN into s = 1
            raise ValueError(f"{what} hold NaN/Inf at channel {int(bad[0])}")
    s = np.power(np.maximum(a, _EPS), alpha) / np.power(np.maximum(w, _EPS), 1.0 - alpha)
    s = np.where((a > 0) & (w > 0), s, 1.0)
    s = np.clip(s, 2.0**-20, 2.0**20)  # finite inputs: an overflow is +inf, clipped here
    return np.exp2(np.round(np.log2(s))) if pow2 else s


def quantize_per_channel_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per-output-column fake quantization of ``W[K, N]``."""
    s = np.abs(w).max(axis=0, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    return (np.clip(np.rint(w / s), -127, 127) * s).astype(np.float32)


def quantize_act(x: np.ndarray, kind: str, absmax: float | np.ndarray | None = None) -> np.ndarray:
    """Fake-quantize rows ``X[T, K]``: per-token abs-max, or static with the abs-max ``absmax``
    (a scalar, or one value per row when each row's range comes from other data)."""
    if kind == "per-token":
        s = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-8) / 127.0
    else:
        a = np.asarray(absmax if absmax is not None else 0.0, np.float32)
        s = np.maximum(a.reshape(-1, 1) if a.ndim else a, 1e-8) / np.float32(127.0)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


def loo_ranges(window_absmax: np.ndarray, row_window: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per row, the static range ``max_j max|X_j|/s_j`` over every calibration window but the row's own.

    A range calibrated without the row's window shows how often unseen data exceeds it
    (saturation), which a range over all data hides.
    """
    m = (window_absmax / s[None, :]).max(axis=1)
    if len(m) < 2:
        return np.full(len(row_window), float(m.max()) if len(m) else 0.0, np.float32)
    order = np.argsort(-m)
    loo = np.where(np.arange(len(m)) == order[0], m[order[1]], m[order[0]])
    return loo[row_window].astype(np.float32)


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, act: str,
                act_absmax: np.ndarray, refs: list[np.ndarray],
                windows: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Relative squared error of the group's quantized outputs with smoothing ``s`` (None: no smoothing).

    ``windows = (window_absmax[W, C], row_window[T])`` makes static ranges leave-one-window-out.
    """
    s32 = np.ones(x.shape[1], np.float32) if s is None else s.astype(np.float32)
    if act == "static" and windows is not None:
        rng = loo_ranges(windows[0], windows[1], s32)
    else:
        rng = float(np.max(act_absmax / s32))
    xq = quantize_act(x / s32, act, rng)
    num = den = 0.0
    for w, ref in zip(weights, refs):
        y = xq @ quantize_per_channel_int8(w * s32[:, None])
        num += float(np.sum((y - ref) ** 2, dtype=np.float64))
        den += float(np.sum(ref.astype(np.float64) ** 2))
    return num / max(den, 1e-30)
