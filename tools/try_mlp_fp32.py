#!/usr/bin/env python3
"""An fp16 int4 folder rewritten so that its MLPs compute in float32 (an experiment, docs/half.md).

    python tools/try_mlp_fp32.py SRC_DIR OUT_DIR

Every ``mlp/gate_proj`` and ``mlp/down_proj`` ``MatMulNBits`` gets float32 scales (and float zero
points, if any), one ``Cast(to=float)`` on the gate/up input and one ``Cast(to=float16)`` after down,
so ORT's CPU provider, which has no fp16 QuickGelu or Mul, needs no Casts of its own inside the MLP
(60 Casts of 576-wide rows instead of 90 of 1536-wide ones on SmolLM2).  Measured: no decode gain,
so no pass does it.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def main(src: str, dst: str) -> None:
    model = onnx.load(os.path.join(src, "model.onnx"))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    del graph.value_info[:]  # the MLP's types change
    nodes = []
    for n in graph.node:
        if n.op_type == "MatMulNBits" and ("mlp/gate_proj" in n.name or "mlp/down_proj" in n.name):
            for slot in (2, 3):
                t = inits.get(n.input[slot]) if len(n.input) > slot else None
                if t is not None and t.data_type == onnx.TensorProto.FLOAT16:
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            if "gate_proj" in n.name:
                cast = helper.make_node("Cast", [n.input[0]], [n.input[0] + "_f32"], to=onnx.TensorProto.FLOAT,
                                        name=n.name + "_in32")
                n.input[0] = cast.output[0]
                nodes += [cast, n]
            else:
                out = n.output[0]
                n.output[0] = out + "_f32"
                nodes += [n, helper.make_node("Cast", [n.output[0]], [out], to=onnx.TensorProto.FLOAT16,
                                              name=n.name + "_out16")]
            continue
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.startswith("model.onnx"):
            shutil.copy(os.path.join(src, f), dst)
    onnx.save(model, os.path.join(dst, "model.onnx"), save_as_external_data=True, location="model.onnx_data")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
