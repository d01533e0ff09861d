"""Quantization candidates of one linear, their numerics in numpy, and what they cost.

Notation (``+`` joins a weight and an activation part):

* ``w{b}g{g}``: b-bit weights in groups of g rows (``w4g128``); ``w{b}c``: per output
  channel (``w8c``);
* ``a8tensor``: static symmetric int8 activation, one scale ``s = max|x|/127`` from the
  calibration range; ``a8token``: dynamic symmetric int8, one scale per row,
  ``s_t = max(max_c |x_t|, ε)/127`` (the W8A8 canonical forms, :mod:`qcompiler.quant.w8a8`);
* e.g. ``w8c+a8token`` is W8A8 with per-token activations.

Weights go through the registered weight method (``rtn`` by default, with the spec's
sym/asym and clip), so a candidate's ``Ŵ`` is bit-exact what ``quantize-weights`` writes.

Cost of a weight option on ``W[K, N]`` (``f`` = bits of the float scale, 32 for a
float32 model; zero points only when asymmetric)::

    nominal bits per weight  = b + (f + b·[asym]) / g                (g = K per channel)
    stored bytes (MatMulNBits) = N·nb·B·b/8 + N·nb·f/8 + [asym]·N·⌈nb·b/8⌉,
                                 B = block (g, or the power of two ≥ K per channel), nb = ⌈K/B⌉

``--budget`` (average bits) uses the nominal count; ``--max-size`` uses stored bytes,
padding included (``w4g128`` on ``K = 576`` pads to 640 rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from qcompiler.errors import QCError
from qcompiler.quant.methods import get_weight_method
from qcompiler.quant.packing import matmulnbits_block_size
from qcompiler.quant.w8a8 import PER_TOKEN_EPS, static_qparams
from qcompiler.spec import Granularity, QuantSpec

_WEIGHT = re.compile(r"^w(?P<bits>[2348])(?:g(?P<group>\d+)|(?P<channel>c))$")
ACTIVATIONS = ("a8tensor", "a8token")
DEFAULT_CANDIDATES = ("w4g128", "w4g32", "w8c", "a8tensor", "a8token")
DEFAULT_OPTIONS = ("w4g128", "w4g64", "w4g32", "w8c")


@dataclass(frozen=True)
class Candidate:
    """One way to quantize a linear (weight part, activation part or both)."""

    name: str
    weight: QuantSpec | None
    activation: str | None  # None | "tensor" | "token"

    @property
    def is_weight_only(self) -> bool:
        return self.weight is not None and self.activation is None

    def describe(self) -> str:
        parts = [self.weight.describe()] if self.weight is not None else ["float weights"]
        parts.append({"tensor": "int8 per-tensor activations", "token": "int8 per-token activations",
                      None: "float activations"}[self.activation])
        return ", ".join(parts)

    def group(self, k: int) -> int:
        if self.weight is None:
            return k
        return k if self.weight.granularity != Granularity.GROUP else self.weight.group_size

    def nominal_bits(self, k: int, float_bits: int = 32) -> float:
        """Average stored bits per weight, without padding (see module docstring)."""
        if self.weight is None:
            return float(float_bits)
        b = self.weight.bits
        return b + (float_bits + (0 if self.weight.symmetric else b)) / min(self.group(k), k)

    def nominal_cost(self, k: int, n: int, float_bits: int = 32) -> int:
        """Bits of ``W[K, N]`` (an integer: b·K·N + (f + zp)·groups·N)."""
        if self.weight is None:
            return float_bits * k * n
        b = self.weight.bits
        groups = -(-k // min(self.group(k), k))
        return b * k * n + (float_bits + (0 if self.weight.symmetric else b)) * groups * n

    def stored_bytes(self, k: int, n: int, float_bits: int = 32) -> int:
        """Bytes of the emitted weight (MatMulNBits layout for 4/8 bits; 4-bit storage below)."""
        if self.weight is None:
            return float_bits // 8 * k * n
        b = self.weight.bits
        g = self.group(k)
        if b not in (4, 8):  # DequantizeLinear int4/uint4 storage: no saving below 4 bits
            groups = -(-k // min(g, k))
            return (k * n + 1) // 2 + groups * n * float_bits // 8 + (0 if self.weight.symmetric else (groups * n + 1) // 2)
        block = matmulnbits_block_size(g, k)
        nb = -(-k // block)
        data = n * nb * block * b // 8
        scales = n * nb * float_bits // 8
        zps = 0 if self.weight.symmetric else n * (-(-nb * b // 8))
        return data + scales + zps


def parse_candidate(name: str, sym: bool = False, method: str = "rtn", clip: str = "minmax") -> Candidate:
    """``"w4g128"`` / ``"w8c+a8token"`` / ``"a8tensor"`` → :class:`Candidate` (see module docstring)."""
    weight: QuantSpec | None = None
    act: str | None = None
    parts = [p.strip() for p in name.strip().lower().split("+") if p.strip()]
    if not parts:
        raise QCError("empty quantization option")
    for part in parts:
        m = _WEIGHT.match(part)
        if m and weight is None:
            bits = int(m["bits"])
            try:
                if m["channel"]:
                    weight = QuantSpec(bits, sym, Granularity.CHANNEL, 128, method, clip)
                else:
                    weight = QuantSpec(bits, sym, Granularity.GROUP, int(m["group"]), method, clip)
            except ValueError as e:
                raise QCError(f"quantization option '{name}': {e}") from None
        elif part in ACTIVATIONS and act is None:
            act = "tensor" if part == "a8tensor" else "token"
        else:
            raise QCError(
                f"unknown quantization option '{name}': expected w<bits>g<group> or w<bits>c "
                "(bits 2, 3, 4, 8), a8tensor or a8token, joined by '+', e.g. w4g128 or w8c+a8token"
            )
    canonical = "+".join(p for p in (_weight_name(weight), {"tensor": "a8tensor", "token": "a8token"}.get(act or ""))
                         if p)
    return Candidate(canonical, weight, act)


def _weight_name(spec: QuantSpec | None) -> str:
    if spec is None:
        return ""
    return f"w{spec.bits}c" if spec.granularity != Granularity.GROUP else f"w{spec.bits}g{spec.group_size}"


def parse_candidates(names: tuple[str, ...] | list[str], sym: bool = False, method: str = "rtn",
                     clip: str = "minmax") -> list[Candidate]:
    out: dict[str, Candidate] = {}
    for n in names:
        c = parse_candidate(n, sym, method, clip)
        out.setdefault(c.name, c)
    if not out:
        raise QCError("no quantization option given")
    return list(out.values())


# ----------------------------------------------------------------------------- numerics


def fake_quant_weight(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``Ŵ`` as ``quantize-weights`` would write it (through the registered method)."""
    method = get_weight_method(spec.method)
    try:
        return method(w, spec).dequantize()
    except TypeError:  # methods that need a node/context (calibrated ones) are not data-free
        raise QCError(f"weight method '{spec.method}' needs the model and calibration; "
                      "the analysis evaluates data-free methods (rtn)") from None


def fake_quant_tensor(x: np.ndarray, absmax: float) -> np.ndarray:
    """Static symmetric int8 with the calibrated range ``[-absmax, absmax]``."""
    scale, _ = static_qparams(-absmax, absmax, "int8", symmetric=True)
    s = np.float32(scale)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


def fake_quant_token(x: np.ndarray) -> np.ndarray:
    """Dynamic symmetric int8, one scale per row (last axis = channels)."""
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), PER_TOKEN_EPS) / np.float32(127.0)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


def fake_quant_activation(x: np.ndarray, kind: str | None, absmax: float | None) -> np.ndarray:
    if kind is None:
        return x
    if kind == "token":
        return fake_quant_token(x)
    if absmax is None:
        raise QCError("per-tensor activation quantization needs the calibrated range of the input")
    return fake_quant_tensor(x, absmax)
