#!/usr/bin/env python3
"""Which nodes ONNX Runtime's CPU provider runs through inserted Casts (fp16/bf16 graphs).

    python tools/ort_casts.py MODEL_DIR... [--out runs/ort_casts] [--profile ROUNDS]

Opens the model with every graph optimization on and saves the graph ORT will run
(``SessionOptions.optimized_model_filepath``), then prints: the op types of the model's own graph
with a node of a half type and no CPU kernel for that type (``get_all_opkernel_def``: ORT computes
them in float32 between Casts it inserts), the model's own Cast count, and the Casts of the optimized
graph grouped by (producer, target type, consumers) — which ones ORT inserted, around which ops.

``--profile ROUNDS``: then ORT's profiler on each folder in turn (round-robin, 1 thread, idle
threads sleeping): a 256-token prefill and 32 greedy decode steps; per op type, the kernel time per
decode step (best of the rounds), and decode tokens per CPU-second.
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import onnx
import onnxruntime as ort

_HALF = {onnx.TensorProto.FLOAT16: "tensor(float16)", onnx.TensorProto.BFLOAT16: "tensor(bfloat16)"}


def cpu_kernels(type_str: str) -> set[tuple[str, str]]:
    """(domain, op) pairs with a CPU kernel accepting ``type_str`` in some type constraint."""
    from onnxruntime.capi import _pybind_state as c

    return {(k.domain or "", k.op_name) for k in c.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"
            and any(type_str in ts for ts in k.type_constraints.values())}


def casts(model: onnx.ModelProto) -> collections.Counter:
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[str]] = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            readers[i].append(n.op_type)
    out: collections.Counter = collections.Counter()
    for n in model.graph.node:
        if n.op_type == "Cast":
            p = producer.get(n.input[0])
            to = onnx.TensorProto.DataType.Name(next(a.i for a in n.attribute if a.name == "to"))
            out[(p.op_type if p else "(input)", to, ",".join(sorted(readers[n.output[0]])) or "(output)")] += 1
    return out


def profile(dirs: list[Path], rounds: int, out: Path, steps: int = 32) -> None:
    import json
    import time

    import numpy as np

    from qcompiler.runtime import DecoderRunner, session_options

    best: dict[Path, dict[str, float]] = {d: {} for d in dirs}
    speed: dict[Path, list[float]] = {d: [] for d in dirs}
    for r in range(rounds):
        for d in dirs:
            so = session_options(1, True, False)
            so.enable_profiling, so.profile_file_prefix = True, str(out / f"profile{r}_{d.name}")
            run = DecoderRunner(ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"]))
            names = ["logits", *run.present_names]
            outs = run.session.run(names, run.feeds((np.arange(256) * 7 + 100) % 40000))
            past, n, nxt = dict(zip(run.past_names, outs[1:])), 256, int(np.argmax(outs[0][0, -1]))
            c0 = time.process_time()
            for _ in range(steps):
                outs = run.session.run(names, run.feeds(np.array([nxt]), past, n))
                past, n, nxt = dict(zip(run.past_names, outs[1:])), n + 1, int(np.argmax(outs[0][0, -1]))
            speed[d].append(steps / (time.process_time() - c0))
            events = json.loads(Path(run.session.end_profiling()).read_text())
            start = [e for e in events if e.get("name") == "model_run"][1]["ts"]  # the decode runs
            per_op: collections.Counter = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                    per_op[e["args"].get("op_name")] += e["dur"] / steps / 1000
            for op, ms in per_op.items():
                best[d][op] = min(best[d].get(op, float("inf")), ms)
    ops = sorted({op for b in best.values() for op in b}, key=lambda op: -max(b.get(op, 0) for b in best.values()))
    print("ms per decode step (best of rounds) | " + " | ".join(d.name for d in dirs))
    print("decode tok/CPU-s (best) | " + " | ".join(f"{max(speed[d]):.2f}" for d in dirs))
    print("all kernels | " + " | ".join(f"{sum(best[d].values()):.2f}" for d in dirs))
    for op in ops[:14]:
        print(f"{op} | " + " | ".join(f"{best[d].get(op, 0):.3f}" for d in dirs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("runs/ort_casts"))
    ap.add_argument("--profile", type=int, default=0, metavar="ROUNDS")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for d in args.model_dirs:
        print(f"== {d}")
        census(d, args.out)
    if args.profile:
        profile(args.model_dirs, args.profile, args.out)


def census(model_dir: Path, out: Path) -> None:
    optimized = out / "optimized.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(optimized)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    so.log_severity_level = 3
    ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    own = onnx.load(model_dir / "model.onnx", load_external_data=False)
    typed = {vi.name: vi.type.tensor_type.elem_type for vi in [*own.graph.value_info, *own.graph.input, *own.graph.output]}
    typed.update({t.name: t.data_type for t in own.graph.initializer})
    for half, type_str in _HALF.items():
        kernels = cpu_kernels(type_str)
        missing = collections.Counter(
            f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in own.graph.node
            if any(typed.get(v) == half for v in [*n.input, *n.output]) and n.op_type not in ("Cast", "Constant")
            and ("" if n.domain in ("", "ai.onnx") else n.domain, n.op_type) not in kernels)
        if missing:
            print(f"{type_str} nodes with no CPU kernel for it (run in float32 between inserted Casts): {dict(missing)}")
    print(f"the model's own Casts: {sum(n.op_type == 'Cast' for n in own.graph.node)}")
    opt = onnx.load(optimized, load_external_data=False)
    found = casts(opt)
    print(f"Casts in the graph ORT runs: {sum(found.values())} (producer, to, readers):")
    for (prod, to, readers), k in found.most_common():
        print(f"  {k:4d}  {prod} -> Cast(to={to}) -> {readers}")
    os.remove(optimized)
    (out / "optimized.onnx.data").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
