"""The canonical view of a decoder graph as the core reads it, without importing ``passes/``.

The ``canonicalize`` pass (``passes/canonicalize.py``, above the core) annotates every
linear with its decoder layer and role and leaves a summary in
``model.graph.meta["qc.canonical"]``.  Core modules (layer-wise running, calibration
requests, structure analysis) only need that summary; they reach the pass through the
pass registry by its name, so the dependency points one way: ``passes/`` → core.
"""

from __future__ import annotations

from typing import Any, Protocol

import onnx_ir as ir

from qcompiler.pipeline import get_pass

#: ``graph.meta`` key of the summary the canonicalize pass leaves
CANONICAL_KEY = "qc.canonical"


class CanonicalView(Protocol):
    """What canonicalize found: the fields core modules read."""

    num_layers: int
    linears: dict[str, ir.Node]  # "layers.3.q_proj" → node
    norms: dict[str, Any]  # "layers.3.q_proj" → the norm match feeding it
    unclassified: list[str]


def canonical_summary(model: ir.Model) -> CanonicalView:
    """The summary of the last canonicalize run, running the registered ``canonicalize`` pass if needed."""
    summary = model.graph.meta.get(CANONICAL_KEY)
    if summary is None:
        get_pass("canonicalize")()(model)
        summary = model.graph.meta[CANONICAL_KEY]
    return summary
