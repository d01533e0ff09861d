#!/usr/bin/env python3
"""Does ONNX Runtime's CPU GroupQueryAttention share the past and present KV buffers (``past_present_share_buffer``)?

    python tools/probe_gqa_share_buffer.py [--past 512] [--max 1024] [--steps 64] [--repeats 3]

One GroupQueryAttention node with SmolLM2's attention shape (9 query heads over 3 KV heads of 64) decodes
``--steps`` tokens after ``--past`` cached ones, two ways, round-robin ``--repeats`` times:

* **copied**: plain ``session.run``; the past cache goes in and the present cache (one longer) comes out as a
  new array every step (what ``qcompiler.runtime.DecoderRunner`` does today);
* **shared**: IOBinding with one ``--max``-long buffer per cache bound as both the past input and the present
  output; ``seqlens_k``/``total_sequence_length`` say how much of it is filled (what onnxruntime-genai does).

Prints the largest difference between the two outputs (0 means the kernel honours the shared buffer) and the
best per-step time of each.  On onnxruntime 1.32 CPU: identical outputs, but the shared form's time grows
with the buffer (1.3× the copied one at a just-large-enough buffer, 7× at 1024, 26× at 4096: docs/fusion.md).  This measures one attention op, not a model: the decoder graphs exported here
compute positions and the mask from the past cache's length, so sharing needs those to read
``attention_mask`` instead (not done; docs/fusion.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

N, KV, H = 9, 3, 64


def build() -> ort.InferenceSession:
    vi = h.make_tensor_value_info
    ins = [vi("q", T.FLOAT, [1, "S", N * H]), vi("k", T.FLOAT, [1, "S", KV * H]), vi("v", T.FLOAT, [1, "S", KV * H]),
           vi("pk", T.FLOAT, [1, KV, "P", H]), vi("pv", T.FLOAT, [1, KV, "P", H]), vi("sl", T.INT32, [1]),
           vi("tl", T.INT32, [])]
    outs = [vi(n, T.FLOAT, None) for n in ("o", "ok", "ov")]
    node = h.make_node("GroupQueryAttention", [i.name for i in ins], ["o", "ok", "ov"], domain="com.microsoft",
                       num_heads=N, kv_num_heads=KV)
    model = h.make_model(h.make_graph([node], "gqa", ins, outs),
                         opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, default=512)
    ap.add_argument("--max", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    s = build()
    rng = np.random.default_rng(0)
    cache_k = rng.standard_normal((1, KV, args.past, H)).astype(np.float32)
    cache_v = rng.standard_normal((1, KV, args.past, H)).astype(np.float32)
    steps = [rng.standard_normal((1, 1, (N + 2 * KV) * H)).astype(np.float32) for _ in range(args.steps)]

    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return x[..., :N * H], x[..., N * H:(N + KV) * H], x[..., (N + KV) * H:]

    def copied() -> list[np.ndarray]:
        pk, pv, out = cache_k, cache_v, []
        for t, x in enumerate(steps):
            q, k, v = split(x)
            pos = args.past + t
            o, pk, pv = s.run(None, {"q": q, "k": k, "v": v, "pk": pk, "pv": pv, "sl": np.array([pos], np.int32),
                                     "tl": np.array(pos + 1, np.int32)})
            out.append(o)
        return out

    def shared() -> list[np.ndarray]:
        kb = np.zeros((1, KV, args.max, H), np.float32)
        vb = np.zeros((1, KV, args.max, H), np.float32)
        kb[:, :, :args.past], vb[:, :, :args.past] = cache_k, cache_v
        kv_k, kv_v = ort.OrtValue.ortvalue_from_numpy(kb), ort.OrtValue.ortvalue_from_numpy(vb)
        out = []
        io = s.io_binding()
        io.bind_ortvalue_input("pk", kv_k)
        io.bind_ortvalue_input("pv", kv_v)
        for t, x in enumerate(steps):
            q, k, v = split(x)
            pos = args.past + t
            for name, a in (("q", q), ("k", k), ("v", v), ("sl", np.array([pos], np.int32)),
                            ("tl", np.array(pos + 1, np.int32))):
                io.bind_cpu_input(name, a)
            io.clear_binding_outputs()
            io.bind_output("o")  # (first: copy_outputs_to_cpu follows the binding order)
            io.bind_ortvalue_output("ok", kv_k)
            io.bind_ortvalue_output("ov", kv_v)
            s.run_with_iobinding(io)
            out.append(io.copy_outputs_to_cpu()[0])
        return out

    best = {"copied": float("inf"), "shared": float("inf")}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("copied", copied), ("shared", shared)):
            t0 = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(results["copied"], results["shared"]))
    print(f"onnxruntime {ort.__version__}: max |copied − shared| = {diff:.3g}")
    for name, t in best.items():
        print(f"{name}: {t * 1e3:.3f} ms per step (past {args.past}, buffer {args.max}, best of {args.repeats})")
    print(f"shared / copied time: {best['shared'] / best['copied']:.2f}×")


if __name__ == "__main__":
    main()
