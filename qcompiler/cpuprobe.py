"""The local CPU and what ONNX Runtime's integer GEMMs compute on it: ISA report and numerics probe.

``qc check --target cpu`` runs, for each integer GEMM form a model holds
(:func:`qcompiler.quant.intgemm.integer_gemms`, plus ``MatMulNBits`` at
``accuracy_level=4``, which quantizes activations to int8 inside), a one-node model on
this machine's CPU provider with inputs chosen so that the exact result is an integer
known in int64 and representable in float32 (``K = 256``, unit scales):

* ``worst+`` / ``worst−``: every activation at its largest code, every weight at its
  largest / smallest (the pair sums ``vpmaddubsw`` saturates on AVX2 without VNNI);
* ``alternating``: activations alternating between their extremes, weights likewise;
* ``random``: uniform codes over the full ranges (seeded).

A form is *exact* when every case equals the int64 reference bit for bit.  The result
depends on this CPU (MLAS dispatches per ISA), which is why the ISA is reported with it.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from qcompiler.quant.intgemm import IntGemm, form_name, integer_gemms, saturation_problem

K, N, M = 256, 32, 4
_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
_NP = {"uint8": np.uint8, "int8": np.int8}

#: the ISA features that decide which MLAS integer kernel runs (x86 /proc/cpuinfo flag → name)
_X86_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512_vnni": "AVX512-VNNI",
                 "avx_vnni": "AVX-VNNI", "avx_vnni_int8": "AVX-VNNI-INT8", "amx_int8": "AMX-INT8"}
_ARM_FEATURES = {"asimd": "NEON", "asimddp": "dot-product", "i8mm": "I8MM", "sve": "SVE"}


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    model: str
    features: tuple[str, ...]

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i386", "i686")

    @property
    def vnni(self) -> bool:
        """Whether MLAS's u8×s8 kernel accumulates in int32 here (VNNI, AMX, or not x86 at all)."""
        return not self.is_x86 or bool({"AVX512-VNNI", "AVX-VNNI", "AMX-INT8"} & set(self.features))

    def describe(self) -> str:
        feats = ", ".join(self.features) or "no SIMD features reported"
        verdict = ("u8×s8 integer GEMMs are exact here" if self.vnni
                   else "no VNNI: u8×s8 integer GEMMs saturate int16 here")
        return f"{self.model} ({self.arch}): {feats}; {verdict}"


@cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU: architecture, model name and the ISA features that matter for integer GEMMs."""
    arch = platform.machine()
    text = Path(cpuinfo).read_text(errors="replace") if Path(cpuinfo).is_file() else ""
    flags: set[str] = set()
    model = platform.processor() or arch
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model") and model in ("", arch, platform.processor()):
            model = value.strip()
    table = _ARM_FEATURES if arch.lower() in ("aarch64", "arm64") else _X86_FEATURES
    features = tuple(name for flag, name in table.items() if flag in flags)
    return CpuInfo(arch, re.sub(r"\s+", " ", model), features)


@dataclass(frozen=True)
class ProbeResult:
    form: str  # e.g. "MatMulIntegerToFloat u8×u8 weights [1, 255]"
    errors: dict[str, float]  # case → max |y − ref| / max |ref|
    used_by: int  # how many GEMMs of the model have this form

    @property
    def exact(self) -> bool:
        return all(e == 0.0 for e in self.errors.values())

    def describe(self) -> str:
        bad = {k: v for k, v in self.errors.items() if v}
        verdict = "exact" if not bad else "WRONG: " + ", ".join(f"{k} {v:.1%} error" for k, v in bad.items())
        return f"{self.form} (×{self.used_by}): {verdict}"


@dataclass(frozen=True)
class _Form:
    op: str
    a_dtype: str
    b_dtype: str
    b_range: tuple[int, int]
    bits: int = 8  # MatMulNBits only

    @property
    def label(self) -> str:
        if self.op == "MatMulNBits":
            return f"MatMulNBits int{self.bits} accuracy_level=4 (int8 activations)"
        return f"{self.op} {form_name(self.a_dtype, self.b_dtype)} weights [{self.b_range[0]}, {self.b_range[1]}]"


def _cases(lo: int, hi: int, shape: tuple[int, ...], rng: np.random.Generator, flip: bool) -> dict[str, np.ndarray]:
    alt = np.where(np.indices(shape).sum(axis=0) % 2 == (1 if flip else 0), hi, lo)
    return {"worst+": np.full(shape, hi), "worst−": np.full(shape, lo if flip else hi), "alternating": alt,
            "random": rng.integers(lo, hi + 1, shape)}


def _inputs(form: _Form) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    a_lo, a_hi = (-127, 127) if form.op == "MatMulNBits" else _RANGES[form.a_dtype]
    b_lo, b_hi = (0, 2**form.bits - 1) if form.op == "MatMulNBits" else form.b_range
    a = _cases(a_lo, a_hi, (M, K), rng, flip=False)
    b = _cases(b_lo, b_hi, (K, N), rng, flip=True)
    return {case: (a[case], b[case]) for case in a}


def _model(form: _Form, b: np.ndarray) -> tuple[bytes, float, int]:
    """A one-node ONNX model of ``form`` with weight ``b``; returns (bytes, a zero point, b zero point)."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, arr: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(np.asarray(arr), name)

    a_zp = 128 if form.a_dtype == "uint8" else 0
    b_zp = 128 if form.b_dtype == "uint8" else 0
    a_t = TensorProto.UINT8 if form.a_dtype == "uint8" else TensorProto.INT8
    out_t = TensorProto.FLOAT
    one = np.array(1.0, np.float32)
    bq = b.astype(_NP[form.b_dtype]) if form.op != "MatMulNBits" else b
    a_type = a_t
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    if form.op == "MatMulIntegerToFloat":
        inits = [init("B", bq), init("sa", one), init("sb", np.ones(N, np.float32)),
                 init("za", np.array(a_zp, _NP[form.a_dtype])), init("zb", np.array(b_zp, _NP[form.b_dtype]))]
        nodes = [helper.make_node("MatMulIntegerToFloat", ["A", "B", "sa", "sb", "za", "zb"], ["Y"],
                                  domain="com.microsoft")]
    elif form.op == "MatMulInteger":
        inits = [init("B", bq), init("za", np.array(a_zp, _NP[form.a_dtype])),
                 init("zb", np.array(b_zp, _NP[form.b_dtype]))]
        nodes = [helper.make_node("MatMulInteger", ["A", "B", "za", "zb"], ["Y"])]
        out_t = TensorProto.INT32
    elif form.op == "DynamicQuantizeMatMul":  # A float in [0, 255] with min 0 and max 255 → scale 1, zp 0
        a_type, a_zp = TensorProto.FLOAT, 0
        inits = [init("B", bq), init("sb", np.ones(N, np.float32)), init("zb", np.array(b_zp, _NP[form.b_dtype]))]
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["A", "B", "sb", "zb"], ["Y"], domain="com.microsoft")]
    elif form.op.startswith("QDQ"):  # ORT fuses Q/DQ·DQ(W)·MatMul into its integer GEMM
        a_type = TensorProto.FLOAT
        inits = [init("B", bq), init("sa", one), init("za", np.array(a_zp, _NP[form.a_dtype])),
                 init("sb", np.ones(N, np.float32)), init("zb", np.full(N, b_zp, _NP[form.b_dtype]))]
        nodes = [helper.make_node("QuantizeLinear", ["A", "sa", "za"], ["aq"]),
                 helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
                 helper.make_node("DequantizeLinear", ["B", "sb", "zb"], ["bd"], axis=1),
                 helper.make_node("MatMul", ["ad", "bd"], ["Y"])]
    elif form.op == "MatMulNBits":  # A integer-valued with a ±127 in every block → int8 codes exactly
        a_type, a_zp = TensorProto.FLOAT, 0
        b_zp = 2 ** (form.bits - 1)
        blk = 32
        codes = b.T.astype(np.uint8).reshape(N, K // blk, blk)
        if form.bits == 4:
            codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        inits = [init("B", codes), init("S", np.ones(N * (K // blk), np.float32))]
        names = ["A", "B", "S"]
        if form.bits == 8:
            inits.append(init("Z", np.full(N * (K // blk), b_zp, np.uint8)))
            names.append("Z")
        nodes = [helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=K, N=N, bits=form.bits,
                                  block_size=blk, accuracy_level=4)]
    else:
        raise ValueError(f"no probe for {form.op}")
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("A", a_type, [None, K])],
                              [helper.make_tensor_value_info("Y", out_t, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return model.SerializeToString(), float(a_zp), b_zp


def probe_form(form: _Form) -> dict[str, float]:
    """Run ``form`` on this CPU for each probe case; case → relative max error against int64."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    errors: dict[str, float] = {}
    for case, (a, b) in _inputs(form).items():
        data, a_zp, b_zp = _model(form, b)
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        a = a.astype(np.int64)
        if form.op == "MatMulNBits":
            a[:, ::32] = 127  # every block's max |a| is 127: the int8 codes are a itself
        if form.op == "DynamicQuantizeMatMul":
            a[0, 0], a[0, 1] = 0, 255  # the dynamic range is exactly [0, 255]: scale 1, zero point 0
        centered = a - int(a_zp)
        if sess.get_inputs()[0].type != "tensor(float)":
            feed = a.astype(_NP[form.a_dtype])
        else:  # QDQ: Q(x, 1, z) = x + z; DynamicQuantizeMatMul / MatMulNBits: a_zp = 0
            feed = centered.astype(np.float32)
        y = sess.run(None, {"A": feed})[0].astype(np.float64)
        ref = centered @ (b.astype(np.int64) - b_zp)
        denom = max(float(np.abs(ref).max()), 1.0)
        errors[case] = float(np.abs(y - ref).max()) / denom
    return errors


def _forms_of(gemms: Iterable[IntGemm]) -> dict[_Form, int]:
    forms: dict[_Form, int] = {}
    for g in gemms:
        op = g.op if g.op in ("MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul") or \
            g.op.startswith("QDQ") else "MatMulInteger"
        f = _Form(op, g.a_dtype, g.b_dtype, g.b_range)
        forms[f] = forms.get(f, 0) + 1
    return forms


def nbits_int8_gemms(model: object) -> dict[int, int]:
    """bits → count of ``MatMulNBits`` nodes with ``accuracy_level=4`` (int8 activations inside)."""
    counts: dict[int, int] = {}
    for node in model.graph.all_nodes():  # type: ignore[attr-defined]
        if node.op_type == "MatMulNBits" and node.attributes.get_int("accuracy_level", 0) == 4:
            bits = node.attributes.get_int("bits", 4)
            counts[bits] = counts.get(bits, 0) + 1
    return counts


def probe(gemms: Iterable[IntGemm], nbits: dict[int, int] | None = None) -> list[ProbeResult]:
    """Probe each distinct integer GEMM form of ``gemms`` (and MatMulNBits int8 paths) on this CPU."""
    forms = _forms_of(gemms)
    for bits, count in sorted((nbits or {}).items()):
        forms[_Form("MatMulNBits", "int8", "uint8", (0, 2**bits - 1), bits)] = count
    return [ProbeResult(f.label, probe_form(f), n) for f, n in forms.items()]


#: the forms ``qc check`` probes even when a model has none, so a report always shows the CPU's verdict
REFERENCE_FORMS = (
    _Form("MatMulIntegerToFloat", "uint8", "uint8", (0, 255)),
    _Form("MatMulIntegerToFloat", "uint8", "int8", (-128, 127)),
    _Form("MatMulIntegerToFloat", "uint8", "int8", (-64, 63)),
)


def probe_reference() -> list[ProbeResult]:
    """The probe of :data:`REFERENCE_FORMS` (u8×u8, full-range u8×s8, 7-bit u8×s8) on this CPU."""
    return [ProbeResult(f.label, probe_form(f), 0) for f in REFERENCE_FORMS]


def integer_gemm_check(model: object, cpu_isa: str | None) -> tuple[list[str], list[str]]:
    """``qc check``'s integer-GEMM findings for an IR model: (notes, issues).

    Notes: this CPU's ISA and the probe of each integer GEMM form the model holds.  Issues:
    GEMMs that saturate on x86 CPUs without VNNI when the model does not declare
    ``cpu_isa=vnni`` (the invariant of ``qcompiler.quant.intgemm``), and any form the probe
    finds inexact on this CPU.
    """
    info = cpu_info()
    gemms = integer_gemms(model)  # type: ignore[arg-type]
    notes = [f"cpu: {info.describe()}"]
    issues: list[str] = []
    unsafe = [g for g in gemms if not g.safe]
    problem = saturation_problem(gemms, cpu_isa)
    if problem:
        issues.append(problem)
    elif unsafe:
        notes.append(f"{len(unsafe)} u8×s8 GEMM(s) full range: the model declares cpu_isa=vnni "
                     f"({'this CPU qualifies' if info.vnni else 'this CPU does NOT qualify'})")
    results = probe(gemms, nbits_int8_gemms(model))
    if not results:
        notes.append("integer GEMMs: none in this model; reference forms on this CPU:")
        results = probe_reference()
    for r in results:
        notes.append(f"probe: {r.describe()}")
        if r.used_by and not r.exact:
            issues.append(f"{r.form} is not exact on this CPU ({r.used_by} GEMM(s) of the model)")
    return notes, issues
