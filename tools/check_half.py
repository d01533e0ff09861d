#!/usr/bin/env python3
"""Type-check half-precision model folders the way a machine without their kernels can.

    python tools/check_half.py MODEL_DIR...

For each folder: the logits' type, the float types of its initializers, ``onnx.checker`` full
check (standard-domain graphs), and ONNX Runtime CPU graph resolution: either a session is
created, or ORT names the first node without a CPU kernel (graph resolution, which type-checks
every node, runs before kernel assignment, so that refusal means the types are consistent).
A type error is printed as ``TYPE ERROR`` and makes the exit status 1.
"""

from __future__ import annotations

import collections
import sys

import onnx
import onnxruntime as ort


def check(folder: str) -> bool:
    path = f"{folder}/model.onnx"
    m = onnx.load(path, load_external_data=False)
    name = onnx.TensorProto.DataType.Name
    floats = collections.Counter(name(t.data_type) for t in m.graph.initializer
                                 if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                    onnx.TensorProto.BFLOAT16))
    logits = [name(o.type.tensor_type.elem_type) for o in m.graph.output if o.name == "logits"]
    checker = "-"
    if all(n.domain in ("", "ai.onnx") for n in m.graph.node):
        try:
            onnx.checker.check_model(path, full_check=True)
            checker = "full check ok"
        except Exception as e:  # onnx raises several checker/inference error types
            checker = f"FAILED: {str(e)[:200]}"
    ok = not checker.startswith("FAILED")
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        ort_res = "CPU session created"
    except Exception as e:  # ORT raises its own exception types
        msg = str(e)
        if "Could not find an implementation for " in msg:
            ort_res = "resolved; no CPU kernel for " + msg.split("Could not find an implementation for ")[1][:80]
        else:
            ort_res, ok = "TYPE ERROR " + msg[:300], False
    print(f"{folder}: logits {logits}, float initializers {dict(floats)}, onnx.checker {checker}, ORT {ort_res}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if all([check(f) for f in sys.argv[1:]]) else 1)
