#!/usr/bin/env python3
"""qcompiler's CUDA ops on a GPU: correctness against the CPU reference, speed against ORT CUDA.

Run on a machine with an NVIDIA GPU (sm_80 / sm_90) and nvcc::

    python tools/bench_cuda_ops.py [--out results.json] [--iters 200] [--quick]

1. builds the CUDA op library (``qc ops build --cuda``) if needed;
2. **kernels** (ctypes, no ONNX Runtime needed): ``W8A8MatMul`` and ``W8A8OutlierMatMul``
   on the GPU against :mod:`qcompiler.ops.reference` (float32 and float16), and their
   time per launch (CUDA events);
3. **through ONNX Runtime's CUDA provider** (needs ``onnxruntime-gpu`` in the environment,
   which replaces ``onnxruntime``: ``pip install onnxruntime-gpu==1.32.0`` in a venv):
   one-node models of ``qcompiler.W8A8MatMul`` (fp16), ``com.microsoft.MatMulNBits``
   (int4, block 32, fp16) and fp16 ``MatMul``, timed with I/O bound on the device, checks
   that every node runs on CUDA, and the ratios qc/MatMulNBits and qc/fp16 in one table,

at decode shapes (M = 1, 2, 4, 8, 16) and prefill (M = 512) for SmolLM2-135M's linears
(576→576, 576→192, 576→1536, 1536→576) and 4096-wide ones (4096→4096, 4096→11008,
11008→4096).  Prints a table and writes JSON.  Exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

from qcompiler.ops import build_library, library_path, reference

SMOLLM2 = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
WIDE = [(4096, 4096), (4096, 11008), (11008, 4096)]
DECODE = [1, 2, 4, 8, 16]
PREFILL = [512]


def load_lib() -> ctypes.CDLL:
    try:
        path = library_path(cuda=True)
    except Exception:
        path = build_library(cuda=True).cuda_library
    lib = ctypes.CDLL(str(path))
    lib.qc_cuda_w8a8_gemm_host.restype = ctypes.c_int
    lib.qc_cuda_w8a8_gemm_host.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double), ctypes.c_char_p, ctypes.c_size_t,
    ]
    lib.qc_cuda_device_count.restype = ctypes.c_int
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def run_kernel(lib: ctypes.CDLL, x: np.ndarray, w: np.ndarray, s: np.ndarray, bias: np.ndarray | None,
               idx: np.ndarray | None, w_out: np.ndarray | None, iters: int) -> tuple[np.ndarray, float]:
    m, k = x.shape
    n = w.shape[0]
    y = np.empty((m, n), x.dtype)
    usec = ctypes.c_double(0.0)
    err = ctypes.create_string_buffer(512)
    dtype = 10 if x.dtype == np.float16 else 1
    r = 0 if idx is None else len(idx)
    rc = lib.qc_cuda_w8a8_gemm_host(dtype, _ptr(x), _ptr(w), _ptr(s), _ptr(bias), _ptr(idx), r, _ptr(w_out),
                                    _ptr(y), m, k, n, 3, iters, ctypes.byref(usec), err, 512)
    if rc != 0:
        raise RuntimeError(f"CUDA kernel failed ({rc}): {err.value.decode()}")
    return y, usec.value


def problem(rng: np.random.Generator, m: int, k: int, n: int, dtype: type, r: int = 0):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    s = (rng.uniform(0.5, 1.5, n) / 127 / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    idx = w_out = None
    if r:
        idx = np.sort(rng.choice(k, r, replace=False)).astype(np.int64)
        x[:, idx] *= 30
        w[:, idx] = 0
        w_out = (rng.standard_normal((r, n)) / np.sqrt(k)).astype(np.float32)
    return x, w, s, bias, idx, w_out


def kernel_checks(lib: ctypes.CDLL, shapes, ms, iters: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k, n in shapes:
        for m in ms:
            for dtype in (np.float16, np.float32):
                for r in (0, 8):
                    x, w, s, b, idx, wo = problem(rng, m, k, n, dtype, r)
                    y, us = run_kernel(lib, x, w, s, b, idx, wo, iters)
                    ref = reference.w8a8_matmul(x, w, s, b, idx, wo)
                    err = float(np.abs(y.astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30))
                    rows.append({"op": "W8A8OutlierMatMul" if r else "W8A8MatMul", "dtype": np.dtype(dtype).name,
                                 "M": m, "K": k, "N": n, "rel_err": err, "kernel_us": round(us, 2)})
    return rows


def ort_models(k: int, n: int, rng: np.random.Generator) -> dict[str, bytes]:
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.quant.numerics import quantize_rtn
    from qcompiler.quant.packing import pack_matmulnbits
    from qcompiler.spec import Granularity, QuantSpec

    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["m", k])
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["m", n])
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("qcompiler", 1)]

    def model(node, inits) -> bytes:
        return helper.make_model(helper.make_graph([node], "g", [x_in], [y_out], inits), opset_imports=ops,
                                 ir_version=10).SerializeToString()

    q8 = quantize_rtn(w, QuantSpec(bits=8, symmetric=True, granularity=Granularity.CHANNEL))
    qc = model(helper.make_node("W8A8MatMul", ["x", "B", "s"], ["y"], domain="qcompiler"),
               [numpy_helper.from_array(np.ascontiguousarray(q8.q.T.astype(np.int8)), "B"),
                numpy_helper.from_array(q8.scale.reshape(-1).astype(np.float32), "s")])
    q4 = quantize_rtn(w, QuantSpec(bits=4, symmetric=True, granularity=Granularity.GROUP, group_size=32))
    packed, scales, _ = pack_matmulnbits(q4.q, q4.scale, None, 4, 32)
    nbits = model(helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                                   block_size=32),
                  [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float16), "s")])
    fp16 = model(helper.make_node("MatMul", ["x", "W"], ["y"]), [numpy_helper.from_array(w.astype(np.float16), "W")])
    return {"qc_w8a8": qc, "ort_matmulnbits_int4": nbits, "ort_fp16_matmul": fp16}


def ort_bench(shapes, ms, iters: int) -> list[dict] | str:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu==1.32.0 in its own "
                "environment): ORT comparisons skipped")
    from qcompiler.ops import register_library

    rng = np.random.default_rng(1)
    rows = []
    for k, n in shapes:
        for name, blob in ort_models(k, n, rng).items():
            so = ort.SessionOptions()
            so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
            if name == "qc_w8a8":
                register_library(so, cuda=True)
            sess = ort.InferenceSession(blob, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            placed = {sub.ep_name for sub in sess.get_provider_graph_assignment_info()}
            for m in ms:
                x = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((m, k)).astype(np.float16), "cuda", 0)
                y = ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float16, "cuda", 0)
                io = sess.io_binding()
                io.bind_ortvalue_input("x", x)
                io.bind_ortvalue_output("y", y)
                for _ in range(5):
                    sess.run_with_iobinding(io)
                io.synchronize_outputs()
                t0 = time.perf_counter()
                for _ in range(iters):
                    sess.run_with_iobinding(io)
                io.synchronize_outputs()
                us = (time.perf_counter() - t0) / iters * 1e6
                rows.append({"impl": name, "M": m, "K": k, "N": n, "us": round(us, 2), "providers": sorted(placed)})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["impl"], r["M"], r["K"], r["N"]): r["us"] for r in rows}
    out = []
    for (impl, m, k, n), us in by.items():
        if impl != "qc_w8a8":
            continue
        nb, fp = by.get(("ort_matmulnbits_int4", m, k, n)), by.get(("ort_fp16_matmul", m, k, n))
        out.append({"M": m, "K": k, "N": n, "qc_us": us, "nbits_int4_us": nb, "fp16_us": fp,
                    "qc/nbits": round(us / nb, 3) if nb else None, "qc/fp16": round(us / fp, 3) if fp else None})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cuda_ops_bench.json")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="one SmolLM2 and one 4096 shape, M = 1, 16, 512")
    args = ap.parse_args()
    lib = load_lib()
    err = ctypes.create_string_buffer(256)
    devices = lib.qc_cuda_device_count(err, 256)
    if devices <= 0:
        print(f"no CUDA device ({err.value.decode() or 'none found'}): nothing to measure", file=sys.stderr)
        return 2
    shapes = [SMOLLM2[2], WIDE[0]] if args.quick else SMOLLM2 + WIDE
    ms = [1, 16, 512] if args.quick else DECODE + PREFILL
    t0 = time.perf_counter()
    kernels = kernel_checks(lib, shapes, ms, args.iters)
    worst = max(r["rel_err"] for r in kernels)
    print(f"kernels vs CPU reference: {len(kernels)} cases, worst relative error {worst:.2e}")
    for r in kernels:
        print(f"  {r['op']:<18} {r['dtype']:<8} M={r['M']:<4} K={r['K']:<6} N={r['N']:<6} "
              f"err={r['rel_err']:.1e}  {r['kernel_us']:.1f} us")
    ort_rows = ort_bench(shapes, ms, args.iters)
    table = ratios(ort_rows) if isinstance(ort_rows, list) else []
    if isinstance(ort_rows, str):
        print(ort_rows)
    else:
        print("through ONNX Runtime CUDA (fp16 activations, I/O on device), microseconds per run:")
        print(f"  {'M':>4} {'K':>6} {'N':>6} {'qc W8A8':>9} {'NBits int4':>10} {'fp16':>8} {'qc/nbits':>9} {'qc/fp16':>8}")
        for r in table:
            print(f"  {r['M']:>4} {r['K']:>6} {r['N']:>6} {r['qc_us']:>9.1f} {r['nbits_int4_us'] or 0:>10.1f} "
                  f"{r['fp16_us'] or 0:>8.1f} {r['qc/nbits'] or 0:>9.3f} {r['qc/fp16'] or 0:>8.3f}")
        off_gpu = {tuple(r["providers"]) for r in ort_rows if r["providers"] != ["CUDAExecutionProvider"]}
        if off_gpu:
            print(f"WARNING: some benchmark nodes were not placed on CUDA: {off_gpu}")
    result = {"devices": devices, "kernels": kernels, "worst_rel_err": worst,
              "ort": ort_rows, "ratios": table, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
