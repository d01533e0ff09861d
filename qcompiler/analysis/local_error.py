"""Error of one linear when only it is quantized, from cached rows of its input.

With input rows ``X[T, K]`` (a seeded sample of calibration tokens), ``Y = X·W`` and
``Ŷ = X̂·Ŵ`` (``X̂``/``Ŵ`` the candidate's fake-quantized activation/weight, either may
be exact), ``E = Ŷ − Y``:

* ``mse  = mean(E²)``;
* ``snr_db = 10·log10(Σ Y² / Σ E²)`` (all rows together);
* ``cosine = mean_t cos(Y_t, Ŷ_t)`` (per row, then averaged);
* ``rel = mean_t ‖E_t‖² / ‖Y_t‖²`` — per-row relative error energy.  Every token is
  renormalized by the next RMSNorm, so a row's *relative* error is what survives; a
  massive-activation token therefore weighs like any other token here, whereas it
  would dominate ``snr_db``.

No other layer is run: this is the "local" error.  :mod:`qcompiler.analysis.sensitivity`
turns ``rel`` into a prediction of the effect on the layer's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from qcompiler.analysis.candidates import Candidate, fake_quant_activation, fake_quant_weight

_TINY = 1e-30


@dataclass(frozen=True)
class ErrorStats:
    mse: float
    snr_db: float
    cosine: float
    rel: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def output_error(y: np.ndarray, y_hat: np.ndarray) -> ErrorStats:
    """Metrics of ``y_hat`` against ``y`` (rows × channels), see module docstring."""
    y = y.astype(np.float64, copy=False)
    e = y_hat.astype(np.float64) - y
    e2 = np.einsum("ij,ij->i", e, e)
    y2 = np.einsum("ij,ij->i", y, y)
    h2 = np.einsum("ij,ij->i", y_hat.astype(np.float64), y_hat.astype(np.float64))
    dot = np.einsum("ij,ij->i", y, y_hat.astype(np.float64))
    cos = dot / np.sqrt(np.maximum(y2 * h2, _TINY))
    snr = 10.0 * np.log10(max(float(y2.sum()), _TINY) / max(float(e2.sum()), _TINY))
    return ErrorStats(
        mse=float(e2.sum() / e.size),
        snr_db=float(min(snr, 300.0)),
        cosine=float(cos.mean()),
        rel=float(np.mean(e2 / np.maximum(y2, _TINY))),
    )


class LinearErrors:
    """Evaluates candidates of one linear on fixed input rows, caching ``Ŵ`` per weight spec."""

    def __init__(self, x: np.ndarray, w: np.ndarray, absmax: float | None = None) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.w = np.ascontiguousarray(w, dtype=np.float32)
        self.absmax = absmax
        self.y = self.x @ self.w
        self._w_hat: dict[object, np.ndarray] = {}
        self._x_hat: dict[str, np.ndarray] = {}

    def weight_hat(self, cand: Candidate) -> np.ndarray:
        if cand.weight is None:
            return self.w
        if cand.weight not in self._w_hat:
            self._w_hat[cand.weight] = fake_quant_weight(self.w, cand.weight)
        return self._w_hat[cand.weight]

    def input_hat(self, cand: Candidate) -> np.ndarray:
        if cand.activation is None:
            return self.x
        if cand.activation not in self._x_hat:
            self._x_hat[cand.activation] = fake_quant_activation(self.x, cand.activation, self.absmax)
        return self._x_hat[cand.activation]

    def error(self, cand: Candidate) -> ErrorStats:
        return output_error(self.y, self.input_hat(cand) @ self.weight_hat(cand))


def linear_errors(x: np.ndarray, w: np.ndarray, candidates: list[Candidate],
                  absmax: float | None = None) -> dict[str, ErrorStats]:
    """``{candidate name: ErrorStats}`` of ``Y = X·W`` with only this linear quantized."""
    le = LinearErrors(x, w, absmax)
    return {c.name: le.error(c) for c in candidates}


def errors_to_dict(errors: Mapping[str, ErrorStats]) -> dict[str, dict[str, float]]:
    return {k: v.to_dict() for k, v in errors.items()}
