#!/usr/bin/env python3
"""Side-by-side: qcompiler recipes vs ONNX Runtime's own quantizers, one command, one table.

    python tools/compare.py MODEL_DIR --text EVAL.txt [--group-size 128] [--rows qc-rtn,ort-rtn,...]
    python tools/compare.py calibration ...      # calibration memory/time vs ORT (tools/compare_calibration.py)
    python tools/compare.py w8a8 ...             # W8A8 recipes vs ORT quantize_static/dynamic (tools/compare_w8a8.py)

Every quantizer runs in its own child process, so its wall time and peak RSS are its
own (``VmHWM`` of that process, see ``qcompiler.memory``); all rows are then evaluated on the same windows of
the same text against the float model (perplexity, KL, top-1 agreement, size on disk).
Rows:

* ``qc-rtn``   — ``qc quantize --recipe w4a16-rtn`` (MatMulNBits, asym, exact min/max)
* ``qc-rtn-sym`` — the same, symmetric; ``qc-rtn-mse`` — MSE-searched clipping (``--clip mse``)
* ``qc-hqq``, ``qc-awq``, ``qc-gptq``, ``qc-awq-gptq`` — recipes ``w4a16-hqq`` / ``-awq`` / ``-gptq`` /
  ``-awq-gptq`` (the calibrated ones read ``--calib``: ``--calib-samples`` windows of
  ``--calib-seq-len`` tokens)
* ``qc-<recipe>`` — any other recipe by name (e.g. ``qc-w8a16-rtn``)
* ``ort-rtn``  — ``onnxruntime.quantization.MatMulNBitsQuantizer`` default RTN (asym unless --sym)
* ``ort-hqq``  — ``MatMulNBitsQuantizer`` with ``HQQWeightOnlyQuantConfig``
* ``genai-int4`` — onnxruntime-genai's model builder ``-p int4 -e cpu`` (its defaults: symmetric g32,
  ``accuracy_level=4``, tied embedding + lm_head as GatherBlockQuantized + MatMulNBits), from the
  model's source (``qcompiler_export.json``) saved as a Hugging Face folder (see ``tools/bench_decode.py``)

Any qcompiler row takes suffixes: ``-sym`` (symmetric), ``@g32`` (group size; ``@g0`` per channel,
default ``--group-size``), ``+emb`` (``--quantize-embeddings``) and ``/n32`` (calibration windows,
default ``--calib-samples``), e.g. ``qc-gptq@g32+emb/n32``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS = {"calibration": "tools.compare_calibration", "w8a8": "tools.compare_w8a8"}


@dataclass(frozen=True)
class RowSpec:
    """``qc-gptq-sym@g32+emb`` → base ``qc-gptq``, group 32, symmetric, embeddings quantized."""

    name: str
    base: str
    group: int
    sym: bool
    emb: bool
    samples: int | None = None

    @classmethod
    def parse(cls, row: str, default_group: int, default_sym: bool) -> RowSpec:
        m = re.fullmatch(r"(?P<base>[a-z0-9-]+?)(?P<sym>-sym)?(?:@g(?P<g>\d+))?(?P<emb>\+emb)?(?:/n(?P<n>\d+))?", row)
        if m is None:
            raise SystemExit(f"cannot read row '{row}' (expected NAME[-sym][@gG][+emb][/nN])")
        group = int(m["g"]) if m["g"] is not None else default_group
        samples = int(m["n"]) if m["n"] is not None else None
        return cls(row, m["base"], group, default_sym or bool(m["sym"]), bool(m["emb"]), samples)


QC_RECIPES = {"qc-rtn": "w4a16-rtn", "qc-hqq": "w4a16-hqq", "qc-awq": "w4a16-awq", "qc-gptq": "w4a16-gptq",
              "qc-awq-gptq": "w4a16-awq-gptq"}


def _quantize_child(row: str, model_dir: str, out_dir: str, group: int, sym: bool, calib: dict[str, object]) -> None:
    """Runs in the child process: quantize, then print {"seconds", "peak_rss_mb"} as the last line."""
    t0 = time.perf_counter()
    spec = RowSpec.parse(row, group, sym)
    peak_children = 0.0
    if spec.base.startswith("qc-"):
        from qcompiler.quantize import quantize
        from qcompiler.recipes import QuantizeOptions, get_recipe

        base = spec.base.removesuffix("-mse")  # qc-rtn-mse: the recipe with --clip mse
        recipe = QC_RECIPES.get(base, base[3:])
        opts = QuantizeOptions(group_size=spec.group, sym=spec.sym, quantize_embeddings=spec.emb,
                               clip="mse" if base != spec.base else "minmax")
        if get_recipe(recipe).needs_calibration:
            if not calib.get("calib"):
                raise SystemExit(f"row {row} needs --calib")
            opts = opts.with_overrides(calib=calib["calib"], calib_samples=spec.samples or calib["samples"],
                                       seq_len=calib["seq_len"])
        quantize(model_dir, out_dir, recipe=recipe, options=opts, force=True)
    elif spec.base == "genai-int4":
        import resource

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tools.bench_decode import _genai  # the builder wrapper shared with the decode benchmark

        source = json.loads((Path(model_dir) / "qcompiler_export.json").read_text())["source"]
        work = Path(out_dir).with_name(Path(out_dir).name + "-work")
        _genai(source, Path(out_dir), work)
        shutil.rmtree(work, ignore_errors=True)
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    else:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        model = onnx.load(str(Path(model_dir) / "model.onnx"))  # loads external data
        if spec.base == "ort-rtn":
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=spec.group, is_symmetric=spec.sym)
        elif spec.base == "ort-hqq":
            cfg = mnq.HQQWeightOnlyQuantConfig(block_size=spec.group, bits=4)
        else:
            raise SystemExit(f"unknown row {row}")
        q = mnq.MatMulNBitsQuantizer(model, algo_config=cfg)
        q.process()
        os.makedirs(out_dir, exist_ok=True)
        q.model.save_model_to_file(str(Path(out_dir) / "model.onnx"), use_external_data_format=True)
        from qcompiler.artifact import copy_side_files

        copy_side_files(Path(model_dir), Path(out_dir))
    from qcompiler.memory import peak_rss_mb

    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2),
                      "peak_rss_mb": round(max(peak_rss_mb(), peak_children), 1)}))


def open_eval_runner(path: Path):
    """A runner for qcompiler/ORT folders, and for genai's (KV head size written as a symbol there)."""
    from qcompiler.runtime import DecoderRunner, KVSpec, make_session, open_runner

    if not (path / "genai_config.json").is_file():
        return open_runner(path)
    import numpy as np

    dec = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    session = make_session(path)
    runner = DecoderRunner.__new__(DecoderRunner)
    runner.session = session
    runner.inputs = {i.name: i for i in session.get_inputs()}
    runner.output_names = [o.name for o in session.get_outputs()]
    runner.past_names = sorted((n for n in runner.inputs if n.startswith("past_key_values.")),
                               key=lambda n: (int(n.split(".")[1]), n))
    runner.present_names = [n.replace("past_key_values", "present") for n in runner.past_names]
    runner.kv = KVSpec(dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], np.dtype(np.float32))
    return runner


def quantized_row(row: str, cmd: list[str], out: Path, windows: Any, ref: Any, base_ppl: float,
                  open_eval: Callable[[Path], Any] | None = None) -> tuple[dict[str, Any], Path | None]:
    """One row: ``cmd`` quantizes into ``out`` in a child process (its last stdout line:
    ``{"seconds", "peak_rss_mb"}``), then the result is scored against ``ref`` on ``windows``.
    Returns the row (``error`` when the child failed) and the model folder (None then)."""
    from qcompiler.artifact import open_model_dir
    from qcompiler.eval import evaluate_windows
    from qcompiler.runtime import open_runner

    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"row": row, "error": f"failed: {tail}"}, None
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    md = open_model_dir(out)
    res = evaluate_windows((open_eval or open_runner)(md.path), windows, ref, name=row, size_bytes=md.size_bytes(),
                           progress=False)
    return {
        "row": row,
        "perplexity": res.perplexity,
        "delta_pct": 100 * (res.perplexity / base_ppl - 1),
        "kl": res.kl,
        "top1": res.top1_agreement,
        "size_mb": md.size_bytes() / 1e6,
        "quantize_s": cost["seconds"],
        "peak_rss_mb": cost["peak_rss_mb"],
    }, md.path


def run_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from qcompiler.artifact import open_model_dir
    from qcompiler.data import make_windows, read_text, tokenize
    from qcompiler.eval import evaluate_windows
    from qcompiler.runtime import open_runner

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qc-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = open_model_dir(args.model_dir)
    windows = make_windows(tokenize(fp32.path, read_text(args.text)), args.seq_len, args.max_tokens).ids
    ref = open_runner(fp32.path)
    base = evaluate_windows(ref, windows, name="fp32", size_bytes=fp32.size_bytes())
    rows: list[dict[str, object]] = [
        {"row": "fp32", "perplexity": base.perplexity, "size_mb": fp32.size_bytes() / 1e6}
    ]
    for row in args.rows.split(","):
        out = work / row
        shutil.rmtree(out, ignore_errors=True)
        calib = {"calib": args.calib, "samples": args.calib_samples, "seq_len": args.calib_seq_len}
        cmd = [sys.executable, __file__, "_child", row, str(fp32.path), str(out), str(args.group_size), json.dumps(calib)]
        if args.sym:
            cmd.append("--sym")
        rows.append(quantized_row(row, cmd, out, windows, ref, base.perplexity, open_eval_runner)[0])
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return rows


#: the table's columns after ``row``: (heading, key, format)
COLUMNS = (("PPL", "perplexity", ".3f"), ("Δ% vs fp32", "delta_pct", "+.2f"), ("KL", "kl", ".4f"),
           ("top-1", "top1", ".3f"), ("size MB", "size_mb", ".1f"), ("quantize s", "quantize_s", ".1f"),
           ("peak RSS MB", "peak_rss_mb", ".0f"))


def format_table(rows: list[dict[str, Any]], extra: tuple[tuple[str, str, str], ...] = ()) -> str:
    """A Markdown table of ``rows``: :data:`COLUMNS`, then ``extra`` columns; a missing value is blank."""
    columns = (*COLUMNS, *extra)
    lines = ["| row | " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} |" + "  |" * (len(columns) - 1))
            continue
        cells = [format(v, fmt) if isinstance(v := r.get(key), (int, float)) else "" for _, key, fmt in columns]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        _quantize_child(argv[1], argv[2], argv[3], int(argv[4]), "--sym" in argv, json.loads(argv[5]))
        return 0
    if argv and argv[0] in SECTIONS:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        return int(importlib.import_module(SECTIONS[argv[0]]).main(argv[1:]) or 0)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--text", required=True, help="evaluation text")
    p.add_argument("--rows", default="qc-rtn,ort-rtn,ort-hqq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--calib", default=None, help="calibration text for qc-awq / qc-gptq rows")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--workdir", default=None, help="keep the quantized models here")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = run_rows(args)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
