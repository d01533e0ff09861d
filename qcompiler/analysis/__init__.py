"""Analysis: why a model is hard to quantize, which linears are sensitive, and what precision each needs.

``qc analyze MODEL_DIR --calib PATH --out REPORT_DIR`` (:func:`analyze`) writes
``report.json`` (versioned schema, :mod:`~qcompiler.analysis.schema`) and a
self-contained ``report.html``.  The same measurements drive the ``assign-precision``
pass (``mixed`` recipe), which picks one option per linear under an average-bit or
size budget exactly (:mod:`~qcompiler.analysis.allocate`).

Modules: ``structure`` (where to look, from canonicalize's annotations),
``candidates`` (options, their numerics and costs), ``local_error``, ``sessions``
(recomputing one decoder layer from cached inputs), ``sensitivity``, ``measure``,
``diagnostics``, ``allocate``, ``budget``, ``recommend``, ``plots``, ``html``,
``analyzer`` (the ``qc analyze`` driver).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AnalyzeConfig", "MeasureConfig", "analyze"]


def __getattr__(name: str) -> Any:
    # lazy: passes import qcompiler.analysis.budget at discovery; plotting and ORT stay unloaded until used
    if name in ("AnalyzeConfig", "analyze"):
        from qcompiler.analysis import analyzer

        return getattr(analyzer, name)
    if name == "MeasureConfig":
        from qcompiler.analysis.measure import MeasureConfig

        return MeasureConfig
    raise AttributeError(f"module 'qcompiler.analysis' has no attribute '{name}'")
