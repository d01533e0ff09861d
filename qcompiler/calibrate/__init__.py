"""Calibration: streaming, memory-bounded, cached and resumable activation statistics.

Passes ask for statistics of graph values and get them from the model *as it is
now* (possibly already smoothed or partly quantized)::

    stats = self.context.require_calibration(self.name)(model, [
        StatRequest(x.name, ("absmax_channel", "hessian")),
    ])
    stats.get(x.name, "hessian").xtx            # Σ XᵀX, float32 [K, K]
    stats.get(x.name, "histogram").percentile(99.99)

Only the requested (value, observer) pairs are observed.  Observers (memory per value,
see :mod:`qcompiler.calibrate.observers`): ``minmax``, ``absmax_channel``,
``mean_abs_channel``, ``absmax_token``, ``histogram`` (``percentile``,
``entropy_range``, ``mse_range``), ``hessian`` (one per distinct input: q/k/v share
theirs), ``outliers`` (|x| ≥ 6 per channel, max/median per token) and ``sample`` (a
seeded, bounded subset of rows; also ``Calibrator.capture(model, values, max_rows)``).

Raw activations are never kept across batches; values are observed in sweeps over
groups of layers when ``--max-memory`` requires it (each sweep starts from what the
previous one handed off, so no layer is computed twice); statistics are cached by
(model hash, data hash, observer settings) under ``$QC_CALIB_CACHE`` (default
``~/.cache/qcompiler/calib``, never evicted: delete it freely) and a killed run
resumes from its last finished group.  ``qc calibrate MODEL_DIR --calib PATH --out
STATS_DIR`` runs it on its own; ``tools/compare_calibration.py`` measures it against
ONNX Runtime's ``quantize_static`` calibration.
"""

from __future__ import annotations

from qcompiler.calibrate.config import CalibConfig, StatRequest
from qcompiler.calibrate.engine import Calibrator, RunInfo, fewer_windows, make_calibrator
from qcompiler.calibrate.histogram import Histogram
from qcompiler.calibrate.observers import OBSERVERS, ObserverConfig
from qcompiler.calibrate.plan import parse_memory
from qcompiler.calibrate.requests import linear_inputs, linear_requests
from qcompiler.calibrate.results import Hessian, MinMax, Outliers, Sample
from qcompiler.calibrate.store import CalibrationStats

__all__ = [
    "OBSERVERS",
    "CalibConfig",
    "CalibrationStats",
    "Calibrator",
    "Hessian",
    "Histogram",
    "MinMax",
    "ObserverConfig",
    "Outliers",
    "RunInfo",
    "Sample",
    "StatRequest",
    "fewer_windows",
    "linear_inputs",
    "linear_requests",
    "make_calibrator",
    "parse_memory",
]
