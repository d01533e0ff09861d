"""Integer GEMMs that are exact on every CPU ONNX Runtime meets: the weight encoding and the invariant.

ONNX Runtime's CPU GEMM (MLAS) multiplies a uint8 activation ``A`` by an int8 weight ``B``
with ``vpmaddubsw`` on x86 CPUs that have AVX2 (or AVX-512) but no VNNI: each pair of
products is summed into a *saturating* int16::

    t = sat16(a₀·b₀ + a₁·b₁)          a ∈ [0, 255], b ∈ [−128, 127]

and ``2·255·127 = 64770 > 32767``, so a full-range u8×s8 product is wrong on those CPUs
(AMD Zen 2/3, Intel before Ice Lake / Alder Lake, many cloud VMs) and exact on VNNI ones
(``vpdpbusd`` accumulates in int32).  Exact everywhere, for the cost measured on this
project's AVX2 machine (AMD EPYC, no VNNI; M×K×N = 512×576×1536, one thread, ORT 1.32, an
idle moment; ``tools/bench_intgemm.py`` repeats it, under load u8×u8 measured 1.2× u8×s8):

=================  =========================================  ===========  ========
A × B              where it is exact                           M=512        M=1
=================  =========================================  ===========  ========
u8 × s8 (full)     VNNI, AMX, ARM only (20% error here)        5.0 ms       41 µs
u8 × s8 ∈ [−64,63]  every ISA (``2·255·64 ≤ 32768``), 7-bit W  5.6 ms       44 µs
u8 × u8            every ISA (zero-extended, ``vpmaddwd``)     6.7 ms       43 µs
s8 × s8            every ISA (portable C++ kernel on x86)      30.5 ms      1355 µs
=================  =========================================  ===========  ========

The compiler's choice (``cpu_isa="any"``, the default): **u8 × u8**.  The int8 weight is
stored shifted, ``W_u = W_q + 128`` with a scalar zero point 128, which is exact::

    (A − z_a)·(W_u − 128) = (A − z_a)·W_q

so the weights keep all 8 bits (no accuracy cost) for 1.2–1.35× the u8s8 time in prefill and
about the same in decode; ``s8 × s8`` is 5–6× slower and 7-bit weights cost accuracy.  The
zero point stays one scalar (also when q/k/v and gate/up are packed).  With
``cpu_isa="vnni"`` the user declares the model will only run on VNNI/AMX/ARM CPUs and gets
the int8 weights (u8 × s8) as they are; ``quantization.json`` records it.

For the npu target's QDQ graph ONNX Runtime fuses ``DQ(u8 A)·DQ(s8 W)`` into the same
u8×s8 kernel (and converts int8 activations to uint8 first on x86), so there the weights
are limited to ``[−64, 63]`` (symmetric int8, the format NPU compilers take) unless
``cpu_isa="vnni"``.

:func:`integer_gemms` lists every integer GEMM a graph will run on ONNX Runtime's CPU
provider (integer ops and fusable QDQ MatMuls) with its operand ranges; a GEMM is *safe*
when no pair sum can leave int16 (:func:`pair_sum_safe`) or its activation is not uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import MS_DOMAIN, const_array

CPU_ISAS = ("any", "vnni")
#: the shift that turns a symmetric int8 weight into uint8 with zero point 128
U8_SHIFT = 128
#: int8 weight range whose u8×s8 pair sums fit int16 on every ISA
SAFE_S8 = (-64, 63)

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


def check_cpu_isa(cpu_isa: str) -> str:
    if cpu_isa not in CPU_ISAS:
        raise ValueError(f"cpu_isa must be one of {', '.join(CPU_ISAS)}, got {cpu_isa!r}")
    return cpu_isa


def encode_weight(w_q: np.ndarray, cpu_isa: str = "any") -> tuple[np.ndarray, np.ndarray | None]:
    """The stored weight of an integer GEMM and its zero point (None: none needed).

    ``any``: ``(W_q + 128) as uint8`` with the scalar zero point 128 (u8×u8, exact on every
    ISA); ``vnni``: ``W_q`` as int8 (u8×s8, exact only on VNNI/AMX/ARM CPUs).
    """
    check_cpu_isa(cpu_isa)
    w = np.asarray(w_q)
    if w.min(initial=0) < -128 or w.max(initial=0) > 127:
        raise ValueError("integer GEMM weights must lie in [-128, 127]")
    if cpu_isa == "vnni":
        return np.ascontiguousarray(w, dtype=np.int8), None
    shifted = (w.astype(np.int16) + U8_SHIFT).astype(np.uint8)
    return np.ascontiguousarray(shifted), np.array(U8_SHIFT, np.uint8)


def pair_sum_safe(a_range: tuple[int, int], b_range: tuple[int, int]) -> bool:
    """Whether every ``a₀·b₀ + a₁·b₁`` with ``a`` in ``a_range`` and ``b`` in ``b_range`` fits int16."""
    products = [a * b for a in a_range for b in b_range]
    return 2 * max(products) <= INT16_MAX and 2 * min(products) >= INT16_MIN


@dataclass(frozen=True)
class IntGemm:
    """One integer GEMM as ONNX Runtime's CPU provider will run it."""

    node: str
    op: str  # MatMulIntegerToFloat | MatMulInteger | DynamicQuantizeMatMul | QLinearMatMul | QDQ MatMul
    a_dtype: str  # "uint8" | "int8" (as MLAS sees it)
    b_dtype: str
    b_range: tuple[int, int]  # stored range of the weight (full dtype range when not constant)
    safe: bool  # exact on every ISA

    @property
    def form(self) -> str:
        return form_name(self.a_dtype, self.b_dtype)

    def describe(self) -> str:
        lo, hi = self.b_range
        return f"{self.op} {self.node}: {self.a_dtype} × {self.b_dtype} weights in [{lo}, {hi}]"


def form_name(a_dtype: str, b_dtype: str) -> str:
    """``u8×s8`` etc."""
    short = {"uint8": "u8", "int8": "s8"}
    return f"{short[a_dtype]}×{short[b_dtype]}"


_DTYPES = {ir.DataType.UINT8: "uint8", ir.DataType.INT8: "int8"}
_FULL = {"uint8": (0, 255), "int8": (-128, 127)}


def _int_dtype(value: ir.Value | None) -> str | None:
    """uint8 / int8 of an integer tensor: its own dtype, else what its producer writes."""
    if value is None:
        return None
    if value.dtype in _DTYPES:
        return _DTYPES[value.dtype]
    arr = const_array(value)
    if arr is not None:
        return {np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}.get(arr.dtype)
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Cast":
        return _DTYPES.get(ir.DataType(node.attributes.get_int("to", 0)))
    if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        return _int_dtype(zp) if zp is not None else "uint8"
    return None


def _b_range(value: ir.Value | None, dtype: str) -> tuple[int, int]:
    """Range of the stored weight (constant: its min/max; else the dtype's full range)."""
    arr = const_array(value)
    if arr is None or arr.size == 0:
        return _FULL[dtype]
    return int(arr.min()), int(arr.max())


def _gemm(node: ir.Node, op: str, a: ir.Value | None, b: ir.Value | None, a_dtype: str | None = None) -> IntGemm | None:
    a_dt = a_dtype or _int_dtype(a)
    b_dt = _int_dtype(b)
    if a_dt is None or b_dt is None:
        return None
    b_range = _b_range(b, b_dt)
    if a_dt == "uint8" and b_dt == "int8":
        safe = pair_sum_safe(_FULL["uint8"], b_range)
    else:
        safe = True  # u8×u8 and s8×s8 accumulate products without an int16 pair sum
    return IntGemm(node.name or "?", op, a_dt, b_dt, b_range, safe)


def _qdq_gemm(node: ir.Node) -> IntGemm | None:
    """A float MatMul/Gemm between two DequantizeLinear outputs, which ORT fuses into an integer GEMM.

    On x86 ORT converts an int8 activation to uint8 (``QDQS8ToU8``), so any 8-bit activation
    counts as uint8 here.
    """
    if len(node.inputs) < 2:
        return None
    a_dq, w_dq = (v.producer() if v is not None else None for v in node.inputs[:2])
    if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    if const_array(w_dq.inputs[0]) is None:
        return None
    if _int_dtype(a_dq.inputs[0]) is None:
        return None
    return _gemm(node, f"QDQ {node.op_type}", None, w_dq.inputs[0], a_dtype="uint8")


def integer_gemms(model: ir.Model) -> list[IntGemm]:
    """Every integer GEMM of ``model`` as ONNX Runtime's CPU provider runs it (see the module docstring)."""
    found: list[IntGemm] = []
    for node in model.graph.all_nodes():
        g: IntGemm | None = None
        if node.domain == MS_DOMAIN and node.op_type == "MatMulIntegerToFloat":
            g = _gemm(node, node.op_type, node.inputs[0], node.inputs[1])
        elif node.domain == MS_DOMAIN and node.op_type == "DynamicQuantizeMatMul":
            g = _gemm(node, node.op_type, None, node.inputs[1], a_dtype="uint8")
        elif node.domain in ("", "ai.onnx") and node.op_type == "MatMulInteger":
            g = _gemm(node, node.op_type, node.inputs[0], node.inputs[1])
        elif node.domain in ("", "ai.onnx") and node.op_type == "QLinearMatMul":
            g = _gemm(node, node.op_type, node.inputs[0], node.inputs[3])
        elif node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
            g = _qdq_gemm(node)
        if g is not None:
            found.append(g)
    return found


def unsafe_integer_gemms(model: ir.Model) -> list[IntGemm]:
    """The integer GEMMs that saturate on x86 CPUs without VNNI (u8 × int8 outside [−64, 63])."""
    return [g for g in integer_gemms(model) if not g.safe]


def saturation_problem(gemms: list[IntGemm], cpu_isa: str | None) -> str | None:
    """The invariant: a message when some of ``gemms`` saturate on x86 CPUs without VNNI and the
    model was not declared for VNNI CPUs only (``cpu_isa="vnni"``); None when it holds."""
    unsafe = [g for g in gemms if not g.safe]
    if not unsafe or cpu_isa == "vnni":
        return None
    return (f"{len(unsafe)} integer GEMM(s) saturate int16 on x86 CPUs without VNNI (AVX2, AVX-512 without "
            f"VNNI), e.g. {unsafe[0].describe()}; lower with cpu_isa=any (the default), or pass --cpu-isa vnni "
            "if every CPU the model will run on has VNNI/AMX or is ARM")


def int8_weight_bits(cpu_isa: str, qdq: bool) -> int:
    """Bits of a symmetric int8-stored W8A8 weight: 8, or 7 (|q| <= 63) for static QDQ graphs
    that ONNX Runtime fuses into u8×s8 GEMMs itself and may run on any CPU."""
    return 7 if (qdq and check_cpu_isa(cpu_isa) == "any") else 8
