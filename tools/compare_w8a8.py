#!/usr/bin/env python3
"""W8A8 side by side: qcompiler's w8a8-* recipes vs ONNX Runtime's quantize_static / quantize_dynamic.

    python tools/compare.py w8a8 MODEL_DIR --calib CALIB.txt --text EVAL.txt [--rows ...] [--out DIR]

Every quantizer runs in its own child process (its wall time and peak RSS are its own,
``qcompiler.memory.peak_rss_mb``), calibrated on the same windows of ``--calib``; all rows
are then evaluated on the same windows of ``--text`` against the float model (perplexity,
Δ%, KL, top-1 agreement, size), and their prefill latency (``--prefill`` tokens, median of
``--repeats`` after a warm-up) is measured one after the other in this process, as a
ratio to fp32.  Rows (``--rows``, comma-separated):

* ``qc-static``, ``qc-dynamic``, ``qc-smooth``, ``qc-static-smooth``, ``qc-int8mix`` — the
  ``w8a8-*`` recipes, target cpu (integer ops: MatMulIntegerToFloat);
* ``qc-static-smooth-qdq`` — w8a8-static-smooth with ``--target npu``: the plain QDQ graph,
  which ONNX Runtime CPU fuses itself;
* ``ort-static`` — ``quantize_static`` (QDQ, per-tensor MinMax uint8 activations, per-channel
  int8 weights) on every MatMul (attention scores and lm_head included), ``ort-static-same``
  restricted (``nodes_to_quantize``) to qcompiler's decoder linears;
* ``ort-dynamic`` / ``ort-dynamic-same`` — ``quantize_dynamic`` (per-channel int8 weights) likewise.

``--out DIR`` keeps the models and writes ``rows.json``, ``table.md`` and ``w8a8_analysis.json``
(the outlier channels LLM.int8's criteria find per layer, from qc-int8mix; each smoothed group's
per-channel activation range before/after smoothing, from qc-smooth; the static-aware α and the
channel splits of qc-static-smooth) for the analysis report to plot;
``python tools/compare.py w8a8 analysis DIR`` rewrites that file from an earlier ``--out DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the table and the row loop are the weight-only comparison's
import compare
from compare import quantized_row

QC_ROWS = {
    "qc-static": ("w8a8-static", "cpu"),
    "qc-dynamic": ("w8a8-dynamic", "cpu"),
    "qc-smooth": ("w8a8-smooth", "cpu"),
    "qc-static-smooth": ("w8a8-static-smooth", "cpu"),
    "qc-static-smooth-qdq": ("w8a8-static-smooth", "npu"),
    "qc-int8mix": ("w8a8-int8mix", "cpu"),
}
ORT_ROWS = ("ort-static", "ort-static-same", "ort-dynamic", "ort-dynamic-same")
DEFAULT_ROWS = ",".join([*QC_ROWS, *ORT_ROWS])


# ----------------------------------------------------------------------------- children


def _child(row: str, model_dir: str, out_dir: str, cfg: dict[str, Any]) -> None:
    """Quantize one row (in its own process); print {"seconds", "peak_rss_mb"} as the last line."""
    t0 = time.perf_counter()
    if row in QC_ROWS:
        _qc_child(row, model_dir, out_dir, cfg)
    elif row in ORT_ROWS:
        _ort_child(row, model_dir, out_dir, cfg)
    else:
        raise SystemExit(f"unknown row {row}; rows: {', '.join([*QC_ROWS, *ORT_ROWS])}")
    from qcompiler.memory import peak_rss_mb

    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}))


def _qc_child(row: str, model_dir: str, out_dir: str, cfg: dict[str, Any]) -> None:
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions, get_recipe

    recipe, target = QC_ROWS[row]
    opts = QuantizeOptions(calib=cfg["calib"], calib_samples=cfg["samples"], seq_len=cfg["seq_len"], target=target)
    if row == "qc-smooth":  # the recipe's pipeline, with the per-channel ranges kept for the analysis
        text = get_recipe(recipe).build(opts).replace("smooth-scale{", "smooth-scale{report_channels=true,", 1)
        quantize(model_dir, out_dir, passes=text, options=opts, force=True)
    else:
        quantize(model_dir, out_dir, recipe=recipe, options=opts, force=True)


def _linear_names(model_dir: str) -> list[str]:
    from qcompiler.passes.canonicalize import canonical_summary

    from qcompiler.irutil import load_model
    from qcompiler.spec import Role, linear_info

    model = load_model(Path(model_dir) / "model.onnx")
    summary = canonical_summary(model)
    return [n.name for n in summary.linears.values() if linear_info(n).role != Role.LM_HEAD]  # type: ignore[union-attr]


def _ort_child(row: str, model_dir: str, out_dir: str, cfg: dict[str, Any]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from qcompiler.artifact import copy_side_files

    src = Path(model_dir) / "model.onnx"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodes = _linear_names(model_dir) if row.endswith("-same") else None
    common: dict[str, Any] = {"op_types_to_quantize": ["MatMul"], "per_channel": True, "weight_type": QuantType.QInt8,
                              "nodes_to_quantize": nodes, "use_external_data_format": True}
    if row.startswith("ort-static"):
        from qcompiler.calibrate.windows import load_windows
        from qcompiler.runtime import DecoderRunner, make_session

        windows = load_windows(model_dir, cfg["calib"], cfg["samples"], cfg["seq_len"])
        runner = DecoderRunner(make_session(model_dir, optimize=False))
        feeds = [runner.feeds(ids) for ids in windows.ids]
        del runner

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

        quantize_static(str(src), str(out / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax, **common)
    else:
        quantize_dynamic(str(src), str(out / "model.onnx"), **common)
    copy_side_files(Path(model_dir), out)


# ----------------------------------------------------------------------------- parent


def run_rows(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    from qcompiler.artifact import open_model_dir
    from qcompiler.bench import CachedLogits
    from qcompiler.data import make_windows, read_text, tokenize
    from qcompiler.eval import evaluate_windows
    from qcompiler.runtime import open_runner

    fp32 = open_model_dir(args.model_dir)
    windows = make_windows(tokenize(fp32.path, read_text(args.text)), args.seq_len, args.max_tokens).ids
    ref = CachedLogits.write(work / "fp32-logits", open_runner(fp32.path), windows)
    base = evaluate_windows(ref, windows, name="fp32", progress=False)
    rows: list[dict[str, Any]] = [{"row": "fp32", "perplexity": base.perplexity, "size_mb": fp32.size_bytes() / 1e6}]
    folders: dict[str, Path] = {"fp32": fp32.path}
    cfg = {"calib": str(args.calib), "samples": args.calib_samples, "seq_len": args.calib_seq_len}
    for row in args.rows.split(","):
        out = work / row
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "_child", row, str(fp32.path), str(out), json.dumps(cfg)]
        print(f"[{time.strftime('%H:%M:%S')}] {row} ...", file=sys.stderr, flush=True)
        result, folder = quantized_row(row, cmd, out, windows, ref, base.perplexity)
        rows.append(result)
        if folder is not None:
            folders[row] = folder
    del ref
    if args.prefill > 0:
        _latency(rows, folders, fp32.path, args)
    return rows, folders


def _latency(rows: list[dict[str, Any]], folders: dict[str, Path], fp32: Path, args: argparse.Namespace) -> None:
    """Prefill latency of every emitted model, measured back to back in this process."""
    import numpy as np

    from qcompiler.bench import measure_speed
    from qcompiler.data import read_text, tokenize
    from qcompiler.runtime import open_runner

    prompt = np.resize(tokenize(fp32, read_text(args.text)), args.prefill)
    seconds: dict[str, float] = {}
    for name, folder in folders.items():
        runner = open_runner(folder, threads=args.threads)
        speed = measure_speed(runner, prompt, 0, repeats=args.repeats)
        seconds[name] = args.prefill / speed.prefill_tok_s
        del runner
    for r in rows:
        if r["row"] in seconds:
            r["prefill_s"] = seconds[r["row"]]
            r["prefill_ratio"] = seconds[r["row"]] / seconds["fp32"]


def analysis(folders: dict[str, Path]) -> dict[str, Any]:
    """Outlier channels per layer (qc-int8mix) and per-channel ranges before/after smoothing (qc-smooth)."""
    out: dict[str, Any] = {"outliers": {}, "smoothing": {}}
    mix = folders.get("qc-int8mix")
    if mix is not None:
        rep = json.loads((mix / "quantization.json").read_text())["report"]["mixed-decompose"]
        out["outlier_criteria"] = {k: rep[k] for k in ("threshold", "min_tokens", "min_layers")}
        out["outliers"] = rep["inputs"]
        out["outliers_per_layer"] = outliers_per_layer(rep["inputs"])
    smooth = folders.get("qc-smooth")
    if smooth is not None:
        rep = json.loads((smooth / "quantization.json").read_text())["report"]["smooth-scale"]
        out["smoothing"] = rep["groups"]
    static = folders.get("qc-static-smooth") or folders.get("qc-static-smooth-qdq")
    if static is not None:  # static-aware α and the channel splits on top of it, per group
        rep = json.loads((static / "quantization.json").read_text())["report"]
        keep = ("alpha", "folded_into", "range_before", "range_after")
        out["static_smoothing"] = {k: {f: g.get(f) for f in keep} for k, g in rep["smooth-scale"]["groups"].items()}
        if "split-outliers" in rep:
            out["splitting"] = rep["split-outliers"]
    return out


def outliers_per_layer(inputs: dict[str, Any]) -> dict[str, Any]:
    """``{layer: {"count": outlier dims over the layer's inputs, "dims": {group: [dims]}}}`` (mixed-decompose's report)."""
    layers: dict[str, Any] = {}
    for key, entry in inputs.items():
        _, layer, group = key.split(".", 2)
        cur = layers.setdefault(layer, {"count": 0, "dims": {}})
        if entry["outlier_dims"]:
            cur["dims"][group] = entry["outlier_dims"]
    for cur in layers.values():
        cur["count"] = sum(len(d) for d in cur["dims"].values())
    return layers


def format_table(rows: list[dict[str, Any]]) -> str:
    return compare.format_table(rows, extra=(("prefill s", "prefill_s", ".3f"), ("× fp32", "prefill_ratio", ".2f")))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        _child(argv[1], argv[2], argv[3], json.loads(argv[4]))
        return 0
    if argv and argv[0] == "analysis":  # rewrite w8a8_analysis.json of an earlier --out folder
        from qcompiler.artifact import write_json

        if len(argv) != 2 or not Path(argv[1]).is_dir():
            raise SystemExit("usage: compare.py w8a8 analysis OUT_DIR (a folder written by --out)")
        work = Path(argv[1])
        folders = {p.name: p for p in work.iterdir() if (p / "quantization.json").is_file()}
        write_json(work / "w8a8_analysis.json", analysis(folders))
        print(work / "w8a8_analysis.json")
        return 0
    p = argparse.ArgumentParser(prog="compare.py w8a8", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--calib", required=True, help="calibration text (a different domain than --text)")
    p.add_argument("--text", required=True, help="evaluation text")
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=512, help="prefill length for latency (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="keep models and write rows.json, table.md, w8a8_analysis.json here")
    args = p.parse_args(argv)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qc-w8a8-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows, folders = run_rows(args, work)
        table = format_table(rows)
        print(table)
        if args.out:
            from qcompiler.artifact import write_json

            write_json(work / "rows.json", rows)
            (work / "table.md").write_text(table + "\n")
            write_json(work / "w8a8_analysis.json", analysis(folders))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
