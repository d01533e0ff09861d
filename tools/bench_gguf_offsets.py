"""How to carry a Q4_1 block's float minimum (``w = d·q + m``) in ONNX Runtime: measured.

For one linear (K, N) of SmolLM2's shapes, four graphs over the same Q4_1 blocks:

* ``int-zp + correction``: MatMulNBits(u, d, z=0) + ReduceSum-blocks(X)·M (what --keep-gguf-quant writes);
* ``float zp``: MatMulNBits with float zero points ``z = −m/d`` (``s·(q − z)``: not exact in fp32);
* ``no offset``: MatMulNBits(u, d, z=8) alone (Q4_0's cost, the floor);
* ``fp32``: MatMul with the dequantized weight.

Prints µs per call (decode: 1 token; prefill: 512 tokens) and the max error vs the fp32 product.
``python tools/bench_gguf_offsets.py [--threads 2]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from gguf import GGMLQuantizationType, quants
from onnx import TensorProto, helper, numpy_helper

from qcompiler.quant import gguf_blocks as gb


def _model(k: int, n: int, kind: str, blocks: gb.IntBlocks, w: np.ndarray) -> bytes:
    plane = gb.pack_planes(blocks)[0]
    packed, scales, zps = plane.packed, plane.scales, plane.zero_points
    nb = k // 32
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, n])
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    attrs = {"K": k, "N": n, "bits": 4, "block_size": 32, "accuracy_level": 0}
    nodes = []
    if kind == "fp32":
        inits = [numpy_helper.from_array(w.T.copy(), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    elif kind == "no offset":
        nodes = [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", **attrs)]
    elif kind == "float zp":
        d = blocks.scale
        zf = np.where(d == 0, 0, -blocks.offset / np.where(d == 0, 1, d)).astype(np.float32).reshape(-1)
        inits.append(numpy_helper.from_array(zf, "Z"))
        nodes = [helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", **attrs)]
    else:
        inits += [numpy_helper.from_array(zps, "Z"), numpy_helper.from_array(blocks.offset.T.copy(), "M"),
                  numpy_helper.from_array(np.array([0, 0, nb, 32], np.int64), "shape"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axes")]
        nodes = [helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y0"], domain="com.microsoft", **attrs),
                 helper.make_node("Reshape", ["x", "shape"], ["xb"]),
                 helper.make_node("ReduceSum", ["xb", "axes"], ["bs"], keepdims=0),
                 helper.make_node("MatMul", ["bs", "M"], ["c"]),
                 helper.make_node("Add", ["y0", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    print(f"onnxruntime {ort.__version__}, {args.threads} threads; µs per call (median)")
    print("| K×N | form | decode µs | prefill-512 µs | max err vs fp32 product |")
    print("|---|---|---|---|---|")
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        raw = quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, GGMLQuantizationType.Q4_1)
        blocks = gb.decode(raw, GGMLQuantizationType.Q4_1, (n, k))
        w = blocks.dequantize()
        for kind in ("int-zp + correction", "float zp", "no offset", "fp32"):
            sess = ort.InferenceSession(_model(k, n, kind, blocks, w), so, providers=["CPUExecutionProvider"])
            row = []
            for m in (1, 512):
                x = rng.standard_normal((1, m, k)).astype(np.float32)
                ref = x[0].astype(np.float64) @ w.T.astype(np.float64)
                for _ in range(5):
                    out = sess.run(None, {"x": x})[0]
                ts = []
                for _ in range(args.reps if m == 1 else max(args.reps // 20, 5)):
                    t0 = time.perf_counter()
                    sess.run(None, {"x": x})
                    ts.append(time.perf_counter() - t0)
                row.append(f"{np.median(ts) * 1e6:.1f}")
                err = float(np.abs(out[0] - ref).max()) if kind != "no offset" else float("nan")
            print(f"| {k}×{n} | {kind} | {row[0]} | {row[1]} | {err:.2e} |")


if __name__ == "__main__":
    main()
