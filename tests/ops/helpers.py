"""Builders of W8A8 test models from the emit helpers (until the W8A8 passes produce them)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import QUANT_OPSET, ensure_opset
from qcompiler.ops.emit import emit_outlier_split
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.quant.w8a8 import (
    attach_activation,
    emit_int8_weight,
    emit_per_token_activation,
    emit_static_activation,
)
from qcompiler.spec import DECODER_ROLES, Granularity, QuantSpec, linear_info

INT8_CHANNEL = QuantSpec(bits=8, symmetric=True, granularity=Granularity.CHANNEL, method="rtn")


def decoder_linears(model: ir.Model) -> list[ir.Node]:
    """The canonicalized model's decoder linears (q/k/v/o/gate/up/down), in graph order."""
    return [n for n in model.graph if linear_info(n) is not None and linear_info(n).role in DECODER_ROLES]


def int8_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qw = quantize_rtn(w, INT8_CHANNEL)
    return qw.q.astype(np.int8), qw.scale.reshape(-1).astype(np.float32)


def apply_w8a8(
    model: ir.Model,
    kind: str = "per-token",
    static_scale: float = 0.05,
    static_dtype: str = "int8",
    outliers: tuple[int, ...] = (),
    share: bool = False,
) -> int:
    """Write a canonical W8A8 form on every decoder linear (``kind``: per-token | static).

    With ``outliers``, per-token linears whose input has K > max(outliers) are written in
    the portable outlier-split form instead.  With ``share``, linears reading the same
    input (q/k/v, gate/up) share one per-token subgraph (``attach_activation``).
    Returns the number of linears rewritten.
    """
    graph = model.graph
    nodes = decoder_linears(model)
    shared: dict[int, ir.Value] = {}
    for i, node in enumerate(nodes):
        w = node.inputs[1].const_value.numpy().astype(np.float32)
        base = f"w8a8_{i}"
        if kind == "per-token" and outliers and w.shape[0] > max(outliers):
            idx = np.array(outliers, dtype=np.int64)
            w_rest = w.copy()
            w_rest[idx] = 0
            q, s = int8_weight(w_rest)
            emit_outlier_split(graph, node, q, s, idx, w[idx], base=base)
            continue
        q, s = int8_weight(w)
        emit_int8_weight(graph, node, q, s, base)
        if kind == "per-token" and share and id(node.inputs[0]) in shared:
            attach_activation(node, shared[id(node.inputs[0])], "per-token")
        elif kind == "per-token":
            x = node.inputs[0]
            emit_per_token_activation(graph, node, base)
            shared[id(x)] = node.inputs[0]
        else:
            zp = 0 if static_dtype == "int8" else 128
            emit_static_activation(graph, node, static_scale, zp, static_dtype, base)
    ensure_opset(model, "", QUANT_OPSET)
    return len(nodes)
