"""NaN/Inf checks that name the tensor and the first bad index.

A non-finite weight, bias, norm weight or statistic must stop quantization: a scale
computed from it is NaN (or hidden as 1.0 by a fallback), and the quantized output
would be silently wrong.  :func:`check_model_weights` runs once over a model's float
initializers before any pass (``qc quantize``, ``qc analyze``), so every recipe stops
the same way whichever pass would compute the scales; :func:`require_finite` is the
same check for one array inside a pass.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.errors import InputError

log = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


#: Values checked at a time: the bool mask (and a bfloat16 block's fp32 copy) stay this small.
_BLOCK = 1 << 22


#: the exponent bits of the 16-bit float types (all set: NaN or ±Inf)
_HALF_EXPONENT = {"float16": np.uint16(0x7C00), "bfloat16": np.uint16(0x7F80)}


def nonfinite_summary(a: np.ndarray) -> str:
    """``""`` if every value is finite, else e.g. ``"2 NaN/Inf value(s), the first at [3, 4]"``.

    Checked in blocks of ``_BLOCK`` values (a memory-mapped weight is never copied whole).
    """
    arr = np.asarray(a)
    flat = arr.reshape(-1)
    mask = _HALF_EXPONENT.get(arr.dtype.name)
    bad, first = 0, None
    for i in range(0, flat.size, _BLOCK):
        block = flat[i:i + _BLOCK]
        if mask is not None:  # NaN/Inf: every exponent bit set (numpy's isfinite widens fp16 value by value)
            finite = (block.view(np.uint16) & mask) != mask
        else:
            finite = np.isfinite(block if block.dtype.kind in "fc" else block.astype(np.float32))
        if finite.all():
            continue
        idx = np.flatnonzero(~finite)
        bad += len(idx)
        if first is None:
            first = i + int(idx[0])
    if not bad:
        return ""
    where = list(map(int, np.unravel_index(first, arr.shape))) if arr.ndim else []
    return f"{bad} NaN/Inf value(s), the first at {where}"


def require_finite(a: np.ndarray, what: str) -> None:
    """Raise :class:`InputError` ``"<what> holds N NaN/Inf value(s), the first at [i, j]"``."""
    bad = nonfinite_summary(a)
    if bad:
        raise InputError(f"{what} holds {bad}; refusing to quantize a model with non-finite values")


def check_model_weights(model: ir.Model) -> int:
    """Check every float initializer with more than one element (weights, biases, norm weights,
    embeddings) for NaN/Inf, one tensor at a time; returns how many were checked.

    Scalars are left out: a ``-inf`` scalar is a legitimate mask constant.
    """
    checked = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _FLOAT_TYPES or tensor.size <= 1:
            continue
        require_finite(tensor.numpy(), f"tensor '{name}' {list(tensor.shape.numpy())}")
        release = getattr(tensor, "release", None)
        if release is not None:  # drop the memory map: the passes read it again when they need it
            release()
        checked += 1
    log.debug("checked %d float tensors for NaN/Inf", checked)
    return checked
