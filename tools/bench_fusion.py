#!/usr/bin/env python3
"""CPU seconds of the cpu target's fusion passes on one w4a16-rtn compile, this checkout vs an earlier one.

    python tools/bench_fusion.py MODEL_DIR [--repeats 5] [--baseline-root EARLIER_CHECKOUT]
    python tools/bench_fusion.py --families --baseline-root EARLIER_CHECKOUT


Each run is a fresh child process: it loads ``MODEL_DIR``, runs ``canonicalize`` and
``quantize-weights{bits=4,group_size=128,sym=False}`` (untimed), then each pass of its checkout's
``qcompiler.targets.FUSION_PASSES`` in turn, timing each with ``time.process_time`` (CPU seconds of the
process, all threads) and ``perf_counter``; it prints the passes' times, the op counts of the fused
graph and a digest of its nodes (op, inputs, outputs, attributes in graph order; node names left out,
and onnxscript's generated value names ``val_N`` renumbered in graph order).
Runs alternate between the checkouts (round-robin) and the best of ``--repeats`` is kept per pass and
for the total, which damps the noise of other processes sharing the machine.  ``--baseline-root``
(e.g. ``git archive REV | tar -x -C runs/base``) runs with ``QC_ROOT`` set to it (the development shim
on ``PYTHONPATH`` maps the package there).

``--families`` compiles every described family's tiny model (``qcompiler.families.cache.tiny_export``)
with ``w4a16-rtn`` (g32) and ``w8a8-dynamic`` in each checkout, and compares the compiled graphs (the
same digest) and their logits on one prompt (largest difference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import hashlib, json, sys, time
import onnx_ir as ir
from qcompiler.irutil import load_model, op_types
from qcompiler.pipeline import parse_pipeline, run_passes
from qcompiler.targets import FUSION_PASSES
model = load_model(sys.argv[1] + "/model.onnx")
model, _ = run_passes(model, parse_pipeline("canonicalize,quantize-weights{bits=4,group_size=128,sym=False}"))
times = {}
for p in parse_pipeline(FUSION_PASSES):
    c0, t0 = time.process_time(), time.perf_counter()
    model, _ = run_passes(model, [p])
    times[p.name] = (time.process_time() - c0, time.perf_counter() - t0)
auto = {}  # onnxscript's generated names (val_N) numbered in graph order: they count rewrites, not structure
name = lambda v: "" if v is None else auto.setdefault(v.name, f"val#{len(auto)}") if v.name.startswith("val_") else v.name
value = lambda a: a.value.numpy().tobytes() if isinstance(a.value, ir.TensorProtocol) else repr(a.value)
nodes = [(n.domain, n.op_type, [name(v) for v in n.inputs], [name(v) for v in n.outputs],
          sorted((k, value(a)) for k, a in n.attributes.items())) for n in model.graph]
print(json.dumps({"pipeline": FUSION_PASSES, "times": times, "ops": op_types(model),
                  "digest": hashlib.sha256(repr(nodes).encode()).hexdigest()[:16]}))
"""

FAMILY_CHILD = """
import hashlib, json, re, sys, tempfile
import numpy as np, onnx
from qcompiler.families import FAMILIES
from qcompiler.families.cache import tiny_export
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from qcompiler.runtime import open_runner
out = {}
for mt in sorted(FAMILIES):
    for recipe in ("w4a16-rtn", "w8a8-dynamic"):
        with tempfile.TemporaryDirectory() as tmp:
            quantize(tiny_export(mt) / "onnx", tmp + "/q", recipe=recipe, options=QuantizeOptions(group_size=32))
            g = onnx.load(tmp + "/q/model.onnx", load_external_data=False).graph
            auto = {}  # onnxscript's generated names (val_N) numbered in graph order; a Python id() that
            # fuse-attention put in q/k-norm weight names before 2026-12-07 (a new one every process) dropped
            name = lambda v: auto.setdefault(v, f"val#{len(auto)}") if v.startswith("val_") else re.sub(r"_[0-9]{9,}$", "", v)
            def attr(a):  # a tensor attribute's own name is the value's (Constant): left out with it
                a = onnx.AttributeProto.FromString(a.SerializeToString())
                if a.HasField("t"):
                    a.t.name = ""
                return a.SerializeToString()
            nodes = [(n.domain, n.op_type, [name(v) for v in n.input], [name(v) for v in n.output],
                      sorted(attr(a) for a in n.attribute)) for n in g.node]
            ops = {}
            for n in g.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            logits = open_runner(tmp + "/q", threads=1).logits(np.arange(12) * 5 + 3)
            out[mt + "/" + recipe] = {"digest": hashlib.sha256(repr(nodes).encode()).hexdigest()[:16], "ops": ops,
                                      "logits": np.asarray(logits, np.float32).ravel().tolist()}
print(json.dumps(out))
"""


def run_families(root: str | None) -> dict:
    env = dict(os.environ)
    if root is not None:
        env["QC_ROOT"] = str(Path(root).resolve())
    out = subprocess.run([sys.executable, "-c", FAMILY_CHILD], check=True, capture_output=True, text=True, env=env,
                         cwd=env.get("QC_ROOT"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def families(baseline_root: str) -> None:
    import numpy as np

    cur, base = run_families(None), run_families(baseline_root)
    same = 0
    for key in sorted(cur):
        a, b = cur[key], base.get(key)
        if b is None:
            print(f"{key}: not in the baseline")
            continue
        diff = float(np.abs(np.array(a["logits"]) - np.array(b["logits"])).max())
        ident = a["digest"] == b["digest"]
        same += ident and a["ops"] == b["ops"] and diff == 0.0
        print(f"{key:28s} same graph {ident}, same op counts {a['ops'] == b['ops']}, GQA {a['ops'].get('GroupQueryAttention', 0)}, "
              f"max |logit diff| {diff:.3g}")
    print(f"{same} of {len(cur)} compiled graphs identical with identical logits")


def run_child(model_dir: str, root: str | None) -> dict:
    env = dict(os.environ)
    if root is not None:
        env["QC_ROOT"] = str(Path(root).resolve())
    out = subprocess.run([sys.executable, "-c", CHILD, model_dir], check=True, capture_output=True, text=True, env=env,
                         cwd=env.get("QC_ROOT"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--families", action="store_true", help="compare the tiny families' compiled graphs and logits")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-root", help="an earlier qcompiler checkout (QC_ROOT for the development shim)")
    args = ap.parse_args()
    if args.families:
        if not args.baseline_root:
            ap.error("--families needs --baseline-root")
        families(args.baseline_root)
        return
    if not args.model_dir:
        ap.error("MODEL_DIR is required (or --families)")
    rows = {"current": None, **({"baseline": args.baseline_root} if args.baseline_root else {})}
    runs: dict[str, list[dict]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, root in rows.items():
            r = run_child(args.model_dir, root)
            runs[name].append(r)
            print(json.dumps({"row": name, **{k: v for k, v in r.items() if k != "ops"}}), flush=True)
    for name, rs in runs.items():
        passes = list(rs[0]["times"])
        best = {p: min(r["times"][p][0] for r in rs) for p in passes}
        total = min(sum(t[0] for t in r["times"].values()) for r in rs)
        wall = min(sum(t[1] for t in r["times"].values()) for r in rs)
        print(f"{name}: {rs[0]['pipeline']}")
        print("   " + ", ".join(f"{p} {s:.2f}" for p, s in best.items())
              + f"; total CPU {total:.2f} s (wall {wall:.2f} s), best of {len(rs)}; graph digest {rs[0]['digest']}")
    if len(runs) == 2:
        a, b = runs["current"][0], runs["baseline"][0]
        print(f"same fused graph: {a['digest'] == b['digest']}; same op counts: {a['ops'] == b['ops']}")


if __name__ == "__main__":
    main()
