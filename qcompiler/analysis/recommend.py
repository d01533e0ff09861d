"""A recommendation per linear: weight option and method, activation precision, and why.

* **Weights**: the option the exact budget assignment (:mod:`qcompiler.analysis.budget`)
  gives the linear at the report's ``--budget``.
* **Method**: ``rtn`` unless the linear is among the most sensitive (top ``sensitive_fraction``
  by predicted error at the reference candidate); then ``awq`` when its input carries
  outlier channels (activation-aware scaling protects exactly those), else ``gptq``
  (error feedback over the input Hessian).
* **Activations**: int8 per-tensor if its local output SNR reaches ``act_snr_db``, else
  int8 per-token if that does, else ``smooth-scale`` + per-token when the input has
  outlier channels or a high max/std ratio (SmoothQuant moves them into the weights),
  else float.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qcompiler.analysis.candidates import Candidate
from qcompiler.analysis.local_error import ErrorStats


def recommend(key: str, weight: Candidate, errors: Mapping[str, ErrorStats], sensitive: bool,
              input_outliers: int, severity_class: str, act_snr_db: float = 30.0) -> dict[str, Any]:
    reasons = [f"budget assignment: {weight.name}"]
    if sensitive and input_outliers:
        method = "awq"
        reasons.append(f"among the most sensitive linears and its input has {input_outliers} outlier channel(s)")
    elif sensitive:
        method = "gptq"
        reasons.append("among the most sensitive linears")
    else:
        method = "rtn"
    tensor, token = errors.get("a8tensor"), errors.get("a8token")
    if tensor is None and token is None:
        act = "not analyzed"
    elif tensor is not None and tensor.snr_db >= act_snr_db:
        act = "int8 per-tensor"
        reasons.append(f"per-tensor int8 SNR {tensor.snr_db:.1f} dB")
    elif token is not None and token.snr_db >= act_snr_db:
        act = "int8 per-token"
        reasons.append(f"per-tensor int8 SNR {tensor.snr_db:.1f} dB < {act_snr_db:g}" if tensor else "per-token")
    elif input_outliers or severity_class in ("high", "severe"):
        act = "smooth-scale + int8 per-token"
        reasons.append(f"int8 SNR below {act_snr_db:g} dB with outliers in the input ({severity_class})")
    else:
        act = "float"
        reasons.append(f"int8 SNR below {act_snr_db:g} dB")
    return {"weight": weight.name, "weight_spec": weight.weight.describe() if weight.weight else "float",
            "activation": act, "method": method, "reason": "; ".join(reasons)}
