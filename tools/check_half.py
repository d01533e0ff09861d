#!/usr/bin/env python3
"""Type-check half-precision model folders the way a machine without their kernels can.

    python tools/check_half.py MODEL_DIR...

For each folder: the logits' type, the float types of its initializers, the count of
qcompiler ops, ``onnx.checker`` full check (standard ops checked fully; other domains' nodes
as nodes), and ONNX Runtime CPU graph resolution (qcompiler's op library registered when the
graph uses it): either a session is created, or ORT names the first node without a CPU kernel
(graph resolution, which type-checks every node, runs before kernel assignment, so that
refusal means the types are consistent).
A type error is printed as ``TYPE ERROR`` and makes the exit status 1.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile

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
    types = _value_types(m)
    qc_ops = collections.Counter(f"{n.op_type}({name(types.get(n.input[0], 0))})" for n in m.graph.node
                                 if n.domain == "qcompiler")
    ort_onnx = sorted({n.op_type for n in m.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ORT_ONNX_OPS})
    try:
        _full_check(path, ort_onnx)
        checker = "full check ok" + (f" ({', '.join(ort_onnx)}: ONNX Runtime's ops in the ONNX domain, checked as "
                                     "custom nodes)" if ort_onnx else "")
    except Exception as e:  # onnx raises several checker/inference error types
        checker = f"FAILED: {str(e)[:200]}"
    ok = not checker.startswith("FAILED")
    so = ort.SessionOptions()
    if qc_ops:
        from qcompiler.ops import build_library

        so.register_custom_ops_library(str(build_library(cuda=False).cpu_library))
    try:
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ort_res = "CPU session created"
    except Exception as e:  # ORT raises its own exception types
        msg = str(e)
        if "Could not find an implementation for " in msg:
            ort_res = "resolved; no CPU kernel for " + msg.split("Could not find an implementation for ")[1][:80]
        else:
            ort_res, ok = "TYPE ERROR " + msg[:300], False
    print(f"{folder}: logits {logits}, float initializers {dict(floats)}, qcompiler ops {dict(qc_ops)}, "
          f"onnx.checker {checker}, ORT {ort_res}")
    return ok


#: ops ONNX Runtime registers in the ONNX domain that ONNX itself does not define (the fusions write them)
ORT_ONNX_OPS = frozenset({"SimplifiedLayerNormalization"})


def _full_check(path: str, ops: list[str]) -> None:
    """``onnx.checker`` full check, with ``ops``' nodes moved to a custom domain (in a copy of the graph
    beside the model, so its external data resolves) so the checker checks everything else."""
    if not ops:
        onnx.checker.check_model(path, full_check=True)
        return
    m = onnx.load(path, load_external_data=False)
    for n in m.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in ops:
            n.domain = "ort.onnx_domain"
    m.opset_import.append(onnx.helper.make_opsetid("ort.onnx_domain", 1))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".check-", dir=folder)
    os.close(fd)
    try:
        onnx.save(m, tmp)
        onnx.checker.check_model(tmp, full_check=True)
    finally:
        os.unlink(tmp)


def _value_types(m: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value ONNX shape inference types (graph inputs included)."""
    inferred = onnx.shape_inference.infer_shapes(m)
    return {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.graph.value_info, *inferred.graph.input)}


if __name__ == "__main__":
    sys.exit(0 if all([check(f) for f in sys.argv[1:]]) else 1)
