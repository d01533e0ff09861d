"""Process memory measurements.

``peak_rss_mb`` reads the kernel's high-water mark of *this* address space
(``VmHWM`` in ``/proc/self/status``).  ``getrusage().ru_maxrss`` is not used on Linux
because it survives ``exec``: a process started by a large parent reports the
parent's size.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space so far (MiB)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0



#: Modules a ``qc quantize`` run loads whatever the model (Python, numpy, onnx, onnx_ir, ONNX
#: Runtime, the passes and ORT's symbolic shape inference with sympy): measured 160 MiB, + margin.
QUANTIZE_MODULES_BYTES = 200 << 20


def quantize_peak_bytes(model: ir.Model) -> dict[str, int]:
    """Estimated peak resident bytes of a weight-only ``qc quantize`` of ``model`` (docs/scaling.md).

    ``peak ≈ modules + largest tensor + 3 B × largest linear's values + 20 B × block values``:
    tensors are read one at a time from their mapping (the largest one, e.g. the embedding, is
    resident while it is checked or read); a quantized linear holds one byte per value for ``q``
    plus its packed and concatenated copies while it is packed (fuse-pack-linears,
    lower-matmulnbits); quantization works in column blocks of ``BLOCK_VALUES`` values with about
    five fp32 temporaries.  Everything else a pass makes is spilled to disk.
    """
    from qcompiler.quant.numerics import BLOCK_VALUES

    largest = linear = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None:
            continue
        largest = max(largest, int(t.nbytes))
        shape = list(t.shape.numpy()) if hasattr(t.shape, "numpy") else list(t.shape)
        if len(shape) == 2 and any(u.op_type in ("MatMul", "Gemm") for u, _ in value.uses()):
            linear = max(linear, int(shape[0]) * int(shape[1]))
    parts = {"modules": QUANTIZE_MODULES_BYTES, "largest_tensor": largest, "largest_linear": 3 * linear,
             "blocks": 20 * BLOCK_VALUES}
    parts["total"] = sum(parts.values())
    return parts
