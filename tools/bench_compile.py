#!/usr/bin/env python3
"""RTN compile time: ``qc quantize --recipe w4a16-rtn`` vs ONNX Runtime's ``MatMulNBitsQuantizer``.

    python tools/bench_compile.py MODEL_DIR [--work runs/bench_compile] [--repeats 3] [--group-size 128] [--sym]
                                  [--baseline-root EARLIER_CHECKOUT]

Both tools start from the same fp32 model folder (``model.onnx`` + ``model.onnx_data``) and write an
int4 model folder with external data; each run is a fresh child process (interpreter start and imports
count for both), measured round-robin ``--repeats`` times; the best wall time and the best CPU time
(user + system of the child) of each tool are kept, which damps the noise of other processes sharing
the machine.  ORT's row is its default RTN (``DefaultWeightOnlyQuantConfig``, asymmetric unless
``--sym``) at the same block size; qcompiler's row is the whole default pipeline (canonicalize,
quantize, the cpu target's fusions and lowering to ``MatMulNBits``, the checks, ``quantization.json``).
Prints one JSON line per run and a summary table (ratio = qcompiler / ORT).  ``--baseline-root`` adds an
earlier qcompiler checkout as a third row (e.g. ``git archive REV | tar -x -C runs/base``) and says
whether its ``model.onnx_data`` is byte for byte the current one's.

A ``qc export`` records every value's shape in ``model.onnx`` (``value_info``), which spares
qcompiler's fusions their shape inference, and writes the exporter's ``Constant`` nodes as
initializers; ORT's quantizer is *slower* on such a file (about 1 s on SmolLM2).  When the model
carries ``value_info``, two more rows run on a copy without it and with its small inline initializers
back as ``Constant`` nodes (``-noshapes``: the same graph and weights as optimum writes them): ORT's row
there is its best case, and the ratio is taken against the faster of ORT's two rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ORT_CHILD = """
import os, sys
from pathlib import Path
import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as mnq
src, out, group, sym = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
model = onnx.load(str(Path(src) / "model.onnx"))
cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=sym)
q = mnq.MatMulNBitsQuantizer(model, algo_config=cfg)
q.process()
os.makedirs(out, exist_ok=True)
q.model.save_model_to_file(str(Path(out) / "model.onnx"), use_external_data_format=True)
"""


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(cmd: list[str], out: Path, env: dict[str, str] | None = None, cwd: str | None = None) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = _child_cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--work", default="runs/bench_compile")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--baseline-root", help="an earlier qcompiler checkout, run as a third row with QC_ROOT set to it "
                    "(the development shim on PYTHONPATH maps the package there)")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.model = str(Path(args.model).resolve())
    py = sys.executable
    tools = {
        "qc-w4a16-rtn": [py, "-m", "qcompiler", "quantize", args.model, str(work / "qc"), "--recipe", "w4a16-rtn",
                         "--group-size", str(args.group_size), "--sym" if args.sym else "--asym", "--force"],
        "ort-rtn": [py, "-c", ORT_CHILD, args.model, str(work / "ort"), str(args.group_size), "1" if args.sym else "0"],
    }
    outs = {"qc-w4a16-rtn": work / "qc", "ort-rtn": work / "ort"}
    bare = _without_shapes(Path(args.model), work / "src-noshapes")
    if bare is not None:
        for name in ("qc-w4a16-rtn", "ort-rtn"):
            cmd = list(tools[name])
            cmd[cmd.index(args.model)] = str(bare)
            cmd[cmd.index(str(outs[name]))] = str(work / f"{outs[name].name}-noshapes")
            tools[f"{name}-noshapes"], outs[f"{name}-noshapes"] = cmd, work / f"{outs[name].name}-noshapes"
    envs: dict[str, dict[str, str] | None] = {k: None for k in tools}
    if args.baseline_root:
        tools["qc-baseline"] = [*tools["qc-w4a16-rtn"][:5], str(work / "base"), *tools["qc-w4a16-rtn"][6:]]
        outs["qc-baseline"] = work / "base"
        envs["qc-baseline"] = {**os.environ, "QC_ROOT": str(Path(args.baseline_root).resolve())}
    cwds = {k: (str(Path(args.baseline_root).resolve()) if k == "qc-baseline" else None) for k in tools}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in tools}
    for rep in range(args.repeats):
        for name, cmd in tools.items():
            r = run_one(cmd, outs[name], envs[name], cwds[name])  # (the baseline from its own folder)
            results[name].append(r)
            print(json.dumps({"round": rep + 1, "tool": name, **r}), flush=True)
    best = {k: (min(r["wall_s"] for r in v), min(r["cpu_s"] for r in v)) for k, v in results.items()}
    qc = best["qc-w4a16-rtn"]
    ort = min((v for k, v in best.items() if k.startswith("ort-rtn")), key=lambda v: v[0])  # ORT's best input
    print(f"\nload average {os.getloadavg()[0]:.2f}; best of {args.repeats}, round-robin")
    print("| tool | wall s | CPU s |")
    print("|---|---|---|")
    for k, (w, c) in best.items():
        print(f"| {k} | {w:.2f} | {c:.2f} |")
    print(f"| ratio qc/ort | {qc[0] / ort[0]:.2f}× | {qc[1] / ort[1]:.2f}× |")
    if "qc-baseline" in best:
        b = best["qc-baseline"]
        print(f"| ratio baseline/ort | {b[0] / ort[0]:.2f}× | {b[1] / ort[1]:.2f}× |")
    same = _same_data(work / "qc", work / "base") if "qc-baseline" in best else None
    if same is not None:
        print(f"model.onnx_data identical to the baseline's: {same}")


def _without_shapes(src: Path, dst: Path) -> Path | None:
    """A copy of model folder ``src`` whose ``model.onnx`` has no ``value_info`` (None if it had none):
    the files beside it copied (not hard-linked: onnx_ir refuses external data with several links)."""
    import onnx

    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    if not len(model.graph.value_info):
        return None
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    del model.graph.value_info[:]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    if inline:  # back to Constant nodes, as optimum writes them (ORT's quantizer is slower on many initializers)
        keep = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"{t.name}_Constant", value=t) for t in inline]
        nodes += list(model.graph.node)
        del model.graph.initializer[:], model.graph.node[:]
        model.graph.initializer.extend(keep)
        model.graph.node.extend(nodes)
    onnx.save(model, str(dst / "model.onnx"))
    for f in src.iterdir():
        if f.is_file() and f.name != "model.onnx":
            shutil.copy2(f, dst / f.name)
    return dst


def _same_data(a: Path, b: Path) -> bool:
    import hashlib

    digest = [hashlib.sha256((d / "model.onnx_data").read_bytes()).digest() for d in (a, b)]
    return digest[0] == digest[1]


if __name__ == "__main__":
    main()
