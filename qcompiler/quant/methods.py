"""Registry of data-free weight quantizers used by ``quantize-weights``.

A method maps ``(W[K, N], spec, node=..., context=...)`` to a ``QuantizedWeight``.
``rtn`` is round-to-nearest with exact (or MSE-searched) per-group ranges; other
modules register more (``register_weight_method``).  Methods that need calibration
data or whole-layer state (AWQ, GPTQ) are passes of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from qcompiler.errors import QCError
from qcompiler.quant.numerics import QuantizedWeight, quantize_weight
from qcompiler.spec import QuantSpec

WeightMethod = Callable[..., QuantizedWeight]
_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str) -> Callable[[WeightMethod], WeightMethod]:
    def deco(fn: WeightMethod) -> WeightMethod:
        _METHODS[name] = fn
        return fn

    return deco


def get_weight_method(name: str) -> WeightMethod:
    if name not in _METHODS:
        raise QCError(f"unknown weight quantization method '{name}'; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


@register_weight_method("rtn")
def rtn(w: np.ndarray, spec: QuantSpec, **_: Any) -> QuantizedWeight:
    return quantize_weight(w, spec)


@register_weight_method("hqq")
def hqq(w: np.ndarray, spec: QuantSpec, **_: Any) -> QuantizedWeight:
    """Half-quadratic refinement of per-group scales and integer zero points (no data)."""
    from qcompiler.quant.hqq import quantize_hqq

    return quantize_hqq(w, spec)
