"""qcompiler's own ONNX Runtime ops (domain ``qcompiler``): C++ CPU kernels, CUDA kernels.

The ops (contracts in :mod:`qcompiler.ops.emit`, numerics in :mod:`qcompiler.ops.reference`):

* ``W8A8MatMul``: per-token W8A8 GEMM (dynamic per-row int8 activations × per-channel
  int8 weights, float32/float16/bfloat16 output, optional bias) — ONNX Runtime has none;
* ``W8A8OutlierMatMul``: the same with LLM.int8-style outlier channels kept in float.

``qc ops build`` (:func:`build_library`) compiles them with g++ (and nvcc for the CUDA
kernels); :func:`register_library` loads the library into an ``ort.SessionOptions``;
:func:`library_path` finds it or raises a :class:`~qcompiler.errors.QCError` naming the
build command.  The library declares the slice of ONNX Runtime's C ABI it uses itself
(``csrc/ort_abi.h``); the tests load it into the installed onnxruntime and run every op.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qcompiler.errors import QCError
from qcompiler.ops import build  # noqa: F401  (qcompiler.ops.build, for callers and tests)
from qcompiler.ops.build import (
    BUILD_COMMAND,
    BuildResult,
    NvccMissingError,
    OpsBuildError,
    build_library,
    find_library,
    find_nvcc,
)

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "BUILD_COMMAND",
    "OP_DOMAIN",
    "OP_NAMES",
    "BuildResult",
    "NvccMissingError",
    "OpsBuildError",
    "build_library",
    "cuda_available",
    "find_nvcc",
    "library_path",
    "register_library",
]

OP_DOMAIN = "qcompiler"
OP_NAMES = ("W8A8MatMul", "W8A8OutlierMatMul")


def library_path(cuda: bool = False) -> Path:
    """Path of the built op library (the CUDA variant with ``cuda``); QCError if not built."""
    return find_library(cuda)


def cuda_available() -> bool:
    """Whether the installed onnxruntime offers the CUDA execution provider."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def register_library(session_options: ort.SessionOptions, cuda: bool | None = None) -> Path:
    """Register the op library with ``session_options``; returns the library's path.

    ``cuda=None`` takes the CUDA variant when it is built and onnxruntime has the CUDA
    provider, else the CPU library.
    """
    path: Path | None = None
    if cuda is None:
        if cuda_available():
            try:
                path = library_path(cuda=True)
            except QCError:
                path = None
        cuda = False
    path = path or library_path(cuda=cuda)
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own exception types
        raise QCError(f"ONNX Runtime cannot load qcompiler's op library {path}: {str(e).splitlines()[0]}; "
                      f"rebuild it with '{BUILD_COMMAND} --force'") from None
    return path
