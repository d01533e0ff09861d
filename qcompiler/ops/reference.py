"""numpy references of qcompiler's custom ops (the contract the C++/CUDA kernels meet).

For each row ``r`` of ``A`` (all leading dimensions flattened), with the outlier channels
``idx`` (none for ``W8A8MatMul``) left out::

    s[r]    = max(max_{k ∉ idx} |A[r, k]|, 1e-8) / 127                 (float32)
    q[r, k] = clip(round_half_even(A[r, k] / s[r]), −127, 127),  q[r, idx] = 0
    Y[r, n] = float(Σ_k q[r, k]·B[n, k]) · s[r] · b_scale[n]
              + Σ_j A[r, idx[j]] · B_outlier[j, n] + bias[n]

``B`` is int8 ``[N, K]`` (one row per output channel, K contiguous), ``b_scale`` and
``bias`` float32 ``[N]``, ``B_outlier`` float32 ``[R, N]``.  The integer product is
exact (float64 here — integer sums far below 2^53 — int32 in the kernels).
"""

from __future__ import annotations

import numpy as np

EPS = np.float32(1e-8)


def quantize_rows(a: np.ndarray, outlier_idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 quantization of ``a[..., K]`` → ``(q int8 [M, K], s float32 [M])``."""
    x = np.asarray(a).astype(np.float32).reshape(-1, a.shape[-1])
    if outlier_idx is not None and len(outlier_idx):
        x = x.copy()
        x[:, np.asarray(outlier_idx, dtype=np.int64)] = 0
    amax = np.abs(x).max(axis=-1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    s = (np.maximum(amax, EPS) / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint(x / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def w8a8_matmul(
    a: np.ndarray,
    b: np.ndarray,
    b_scale: np.ndarray,
    bias: np.ndarray | None = None,
    outlier_idx: np.ndarray | None = None,
    b_outlier: np.ndarray | None = None,
) -> np.ndarray:
    """Reference of ``W8A8MatMul`` (and of ``W8A8OutlierMatMul`` with ``outlier_idx``/``b_outlier``).

    ``a`` may be float32, float16 or bfloat16 (``ml_dtypes.bfloat16``): it is read as float32, exactly.
    Returns float32 ``[..., N]``; cast to ``a.dtype`` to compare with a float16/bfloat16 kernel.
    """
    lead, k = a.shape[:-1], a.shape[-1]
    n = b.shape[0]
    assert b.shape == (n, k), f"B must be [N, K]=[{n}, {k}], got {b.shape}"
    q, s = quantize_rows(a, outlier_idx)
    acc = q.astype(np.float64) @ b.astype(np.float64).T  # exact: |sums| < 2^53
    y = acc.astype(np.float32) * s[:, None] * np.asarray(b_scale, np.float32)[None, :]
    if outlier_idx is not None and len(outlier_idx):
        x = np.asarray(a).astype(np.float32).reshape(-1, k)
        y = y + x[:, np.asarray(outlier_idx, dtype=np.int64)] @ np.asarray(b_outlier, np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.astype(np.float32).reshape(*lead, n)
