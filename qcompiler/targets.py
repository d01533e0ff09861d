"""Deployment targets and the lowering passes each appends to a recipe's pipeline.

* ``cpu``: ONNX Runtime CPU — ``MatMulNBits`` for weight-only int4/int8;
* ``cuda``: ONNX Runtime CUDA — ``MatMulNBits`` plus qcompiler's own ops where ORT has none;
* ``npu``: plain QDQ at opset 21, standard-domain ops only (the portable form as is).

Every target's lowering steps are registered at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable

from qcompiler.errors import QCError
from qcompiler.recipes import QuantizeOptions

TARGETS = ("cpu", "cuda", "npu")

_LOWERING: dict[str, list[tuple[int, Callable[[QuantizeOptions], str]]]] = {t: [] for t in TARGETS}


def register_lowering(target: str, order: int, build: Callable[[QuantizeOptions], str]) -> None:
    """Add a lowering step (pipeline text) to ``target``; steps run by increasing ``order``."""
    _LOWERING[target].append((order, build))
    _LOWERING[target].sort(key=lambda x: x[0])


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise QCError(f"unknown target '{target}'; choices: {', '.join(TARGETS)}")
    return target


def lowering_pipeline(target: str, options: QuantizeOptions) -> str:
    check_target(target)
    return ",".join(filter(None, (build(options) for _, build in _LOWERING[target])))


register_lowering("cpu", 50, lambda o: f"lower-matmulnbits{{accuracy_level={o.accuracy_level}}}")
register_lowering("cuda", 50, lambda o: f"lower-matmulnbits{{accuracy_level={o.accuracy_level}}}")
