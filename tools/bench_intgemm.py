#!/usr/bin/env python3
"""Speed and exactness of ONNX Runtime's CPU integer GEMM forms on this machine.

    python tools/bench_intgemm.py [--threads 1] [--repeats 20] [--json OUT]

For SmolLM2-135M's linear shapes (q/k/v+gate/up packed: K=576, N=1536; down: K=1536, N=576)
at M = 1 (decode) and M = 512 (prefill), times ``MatMulIntegerToFloat`` with

* ``u8×s8``  int8 weights, full range (what qcompiler wrote before; saturates without VNNI),
* ``u8×s7``  int8 weights in [−64, 63] (ONNX Runtime's ``reduce_range``),
* ``u8×u8``  uint8 weights ``W_q + 128`` with zero point 128 (qcompiler's default, ``--cpu-isa any``),
* ``u8×u8 per-column zp``  the same with a per-column zero point (packing keeps it scalar),
* ``s8×s8``  int8 activations and weights,

and a float32 ``MatMul`` for scale, and reports each form's relative error on random
full-range codes against an int64 reference, with the CPU's ISA
(``qcompiler.cpuprobe``).  Medians of ``--repeats`` runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"qkv/gate_up (K=576, N=1536)": (576, 1536), "down (K=1536, N=576)": (1536, 576)}
FORMS = ("u8×s8", "u8×s7", "u8×u8", "u8×u8 per-column zp", "s8×s8", "fp32 MatMul")


def _model(form: str, k: int, n: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray, int, int]:
    """(model bytes, stored weight, activation zero point, weight zero point)."""
    w_q = rng.integers(-127, 128, (k, n))
    if form == "fp32 MatMul":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(), w_q, 0, 0
    a_signed = form.startswith("s8")
    if form == "u8×s7":
        stored, zb = np.clip(w_q, -64, 63).astype(np.int8), 0
    elif form.startswith("u8×u8"):
        stored, zb = (w_q + 128).astype(np.uint8), 128
    else:
        stored, zb = w_q.astype(np.int8), 0
    za = 0 if a_signed else 128
    zb_arr = np.full(n, zb, stored.dtype) if "per-column" in form else np.array(zb, stored.dtype)
    inits = [numpy_helper.from_array(stored, "W"), numpy_helper.from_array(np.array(1.0, np.float32), "sa"),
             numpy_helper.from_array(np.ones(n, np.float32), "sb"),
             numpy_helper.from_array(np.array(za, np.int8 if a_signed else np.uint8), "za"),
             numpy_helper.from_array(zb_arr, "zb")]
    node = helper.make_node("MatMulIntegerToFloat", ["A", "W", "sa", "sb", "za", "zb"], ["Y"], domain="com.microsoft")
    a_t = TensorProto.INT8 if a_signed else TensorProto.UINT8
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", a_t, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), stored, za, zb


def bench(threads: int, repeats: int) -> list[dict[str, object]]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    rows = []
    for shape_name, (k, n) in SHAPES.items():
        for form in FORMS:
            rng = np.random.default_rng(0)
            data, stored, za, zb = _model(form, k, n, rng)
            sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            row: dict[str, object] = {"shape": shape_name, "form": form}
            codes = rng.integers(-127, 128, (512, k))
            if form == "fp32 MatMul":
                a = codes.astype(np.float32)
            elif form.startswith("s8"):
                a = codes.astype(np.int8)
            else:
                a = (codes + 128).astype(np.uint8)
            if form != "fp32 MatMul":
                y = sess.run(None, {"A": a})[0].astype(np.float64)
                ref = (a.astype(np.int64) - za) @ (stored.astype(np.int64) - zb)
                row["rel_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
            for m in (1, 512):
                x = a[:m]
                for _ in range(3):
                    sess.run(None, {"A": x})
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    sess.run(None, {"A": x})
                    times.append(time.perf_counter() - t0)
                row[f"M={m} ms"] = round(statistics.median(times) * 1e3, 4)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    from qcompiler.cpuprobe import cpu_info

    info = cpu_info()
    rows = bench(args.threads, args.repeats)
    out = sys.stdout
    out.write(f"CPU: {info.describe()}\nONNX Runtime {ort.__version__}, {args.threads} thread(s)\n\n")
    out.write("| shape | form | rel. error (random codes) | M=1 ms | M=512 ms |\n|---|---|---|---|---|\n")
    for r in rows:
        err = "—" if "rel_err" not in r else ("exact" if r["rel_err"] == 0 else f"{r['rel_err']:.1%}")
        out.write(f"| {r['shape']} | {r['form']} | {err} | {r['M=1 ms']} | {r['M=512 ms']} |\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.describe(), "threads": args.threads, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
