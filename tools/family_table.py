#!/usr/bin/env python3
"""The family coverage table of issue 23: every described family × what qcompiler does with it.

    python tools/family_table.py [--families llama,gemma2] [--columns export,w4a16-rtn,...] [--out docs/families.md]

Each family's tiny random model (:mod:`qcompiler.families.tiny`, 2 layers, hidden 64) is
exported once (:func:`qcompiler.families.cache.tiny_export`, shared with the tests) and
checked; each cell is ``yes``, ``refused (exit N): message`` (a clear :class:`QCError`) or
``no: why`` (a wrong result, or an unexpected exception: a bug).  Columns:

* ``export`` — the ONNX logits equal transformers' (``|Δ| ≤ 4e-5 + 1e-4·max|ref|``);
* ``w4a16-rtn``, ``w8a8-dynamic``, ``w8a8-smooth``, ``w8a8-static-smooth`` (smooth-scale,
  split-outliers, fold-zero-point), ``awq`` (``w4a16-awq``), ``gptq`` (``w4a16-gptq``),
  ``mixed`` (``--budget 6``): the recipe runs with the default cpu target, every decoder
  linear is quantized (coverage: nothing unsupported; only lm_head and MoE routers kept
  float), with the relative logit error ``‖Δ‖/‖centred float logits‖`` on 24 tokens; for
  the smoothing recipes also where each group's scale went (``norm``, a previous linear,
  or an explicit ``Mul``);
* ``analyze`` — ``qc analyze`` (per-linear sensitivities, the budgeted plan) writes its report;
* ``fused attention`` — GroupQueryAttention nodes in the w4a16-rtn cpu model = layers;
* ``generate`` — greedy ``DecoderRunner.generate`` (KV cache) on the float export gives
  transformers' ``generate(do_sample=False)`` tokens (8 new tokens after 8 prompt tokens).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qcompiler.errors import QCError
from qcompiler.families import FAMILIES
from qcompiler.families.cache import tiny_export
from qcompiler.families.tiny import VOCAB

log = logging.getLogger("family_table")

IDS = np.random.default_rng(7).integers(0, VOCAB, 24)
RECIPES = {"w4a16-rtn": "w4a16-rtn", "w8a8-dynamic": "w8a8-dynamic", "w8a8-smooth": "w8a8-smooth",
           "w8a8-static-smooth": "w8a8-static-smooth", "awq": "w4a16-awq", "gptq": "w4a16-gptq", "mixed": "mixed"}
COLUMNS = ("export", *RECIPES, "analyze", "fused attention", "generate")


def calib_text(folder: Path) -> Path:
    """A small seeded word soup for the calibrated recipes (the tiny models are random anyway)."""
    rng = np.random.default_rng(0)
    words = ["the", "model", "graph", "quantize", "layer", "norm", "scale", "weight", "token", "onnx", "int8", "float", "attention"]
    p = folder / "calib.txt"
    p.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return p


def logits(folder: Path) -> np.ndarray:
    from qcompiler.runtime import open_runner

    return open_runner(folder, threads=1).logits(IDS)


def hf_model(base: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32).eval()


def check_export(base: Path) -> str:
    import torch

    with torch.no_grad():
        ref = hf_model(base)(torch.tensor(IDS)[None]).logits[0].numpy()
    err = float(np.abs(logits(base / "onnx") - ref).max())
    ok = err <= 4e-5 + 1e-4 * float(np.abs(ref).max())
    return f"yes (max abs Δ {err:.1e})" if ok else f"no: max abs Δ {err:.2e}"


def greedy_transformers(base: Path, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (``new`` tokens, no early stop)."""
    import torch

    model = hf_model(base)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return [int(t) for t in out[0, len(prompt):]]


def check_generate(base: Path) -> str:
    from qcompiler.runtime import open_runner

    prompt = [int(t) for t in IDS[:8]]
    want = greedy_transformers(base, prompt, 8)
    got = list(open_runner(base / "onnx", threads=1).generate(prompt, 8))
    return "yes" if got == want else f"no: {got} vs transformers {want}"


def _where(report: dict) -> str:
    """Where smooth-scale folded each group: ``norm 4, v_proj 2, mul 2 (why)``."""
    groups = report.get("smooth-scale", {}).get("groups", {})
    count = Counter(g["folded_into"] for g in groups.values())
    why = sorted({g["why_not_folded"] for g in groups.values() if g["folded_into"] == "mul" and "why_not_folded" in g})
    text = ", ".join(f"{k} {v}" for k, v in sorted(count.items()))
    return text + (f"; Mul: {'; '.join(why)}" if why else "")


def check_recipe(base: Path, column: str, work: Path, calib: Path) -> tuple[str, Path | None]:
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    recipe = RECIPES[column]
    opts = QuantizeOptions(calib=str(calib), calib_samples=4, seq_len=64, group_size=32)
    if column == "mixed":
        opts = QuantizeOptions(calib=str(calib), calib_samples=4, seq_len=64, budget=6.0)
    elif recipe.startswith("w8a8-"):
        opts = QuantizeOptions(calib=str(calib), calib_samples=4, seq_len=64) if "smooth" in recipe \
            else QuantizeOptions()
    elif recipe == "w4a16-rtn":
        opts = QuantizeOptions(group_size=32)
    out = work / column
    try:
        summary = quantize(base / "onnx", out, recipe=recipe, options=opts)
    except QCError as e:
        return f"refused (exit {e.exit_code}): {str(e).splitlines()[0]}", None
    except Exception as e:  # a bug: say so in the table, keep going
        log.exception("%s: %s", base.name, column)
        return f"no: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", None
    kept = [k["role"] for k in summary["kept_float"]]
    unexpected = [r for r in kept if r != "lm_head" and not r.endswith(".router")]
    f, q = logits(base / "onnx"), logits(out)
    rel = float(np.linalg.norm(q - f) / np.linalg.norm(f - f.mean(-1, keepdims=True)))
    if summary["coverage"]["unsupported"] or unexpected or not np.isfinite(rel):
        return f"no: kept float {unexpected}, rel {rel:.3g}", out
    extra = f"; {_where(summary['report'])}" if "smooth" in recipe else ""
    return f"yes (rel {rel:.3f}{extra})", out


def check_analyze(base: Path, work: Path, calib: Path) -> str:
    from qcompiler.analysis import AnalyzeConfig, MeasureConfig, analyze

    fast = MeasureConfig(samples=4, seq_len=64, rows=128, block_windows=2, block_seq_len=64, progress=False)
    cfg = AnalyzeConfig(calib=str(calib), cache_dir=str(work / "cache"), measure=fast, budget=5.0,
                        pareto_budgets=(5.0,), e2e_top=2, e2e_windows=2, e2e_seq_len=64)
    try:
        report = analyze(base / "onnx", work / "analysis", cfg)
    except QCError as e:
        return f"refused (exit {e.exit_code}): {str(e).splitlines()[0]}"
    n = len(report.get("linears", report.get("layers", [])))
    return f"yes ({n} linears)" if n else "yes"


def fused_attention(model_dir: Path | None, layers: int) -> str:
    import onnx

    if model_dir is None:
        return "no: no w4a16-rtn model"
    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    n = sum(1 for node in m.graph.node if node.op_type == "GroupQueryAttention")
    return f"yes ({n}/{layers})" if n == layers else f"no ({n}/{layers} GroupQueryAttention)"


def family_row(model_type: str, columns: list[str], calib: Path) -> dict[str, str]:
    base = tiny_export(model_type)
    row: dict[str, str] = {}
    checks: dict[str, Callable[[], str]] = {"export": lambda: check_export(base),
                                            "generate": lambda: check_generate(base)}
    with tempfile.TemporaryDirectory(prefix=f"qc-table-{model_type}-") as tmp:
        rtn_dir = None
        for col in columns:
            t0 = time.perf_counter()
            if col in RECIPES:
                row[col], out = check_recipe(base, col, Path(tmp), calib)
                rtn_dir = out if col == "w4a16-rtn" else rtn_dir
            elif col == "analyze":
                try:
                    row[col] = check_analyze(base, Path(tmp), calib)
                except Exception as e:
                    log.exception("%s: %s", model_type, col)
                    row[col] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            elif col == "fused attention":
                if rtn_dir is None:
                    _, rtn_dir = check_recipe(base, "w4a16-rtn", Path(tmp), calib)
                row[col] = fused_attention(rtn_dir, 2)
            else:
                try:
                    row[col] = checks[col]()
                except Exception as e:
                    log.exception("%s: %s", model_type, col)
                    row[col] = f"no: {type(e).__name__}: {e}"
            log.info("%s %s: %s (%.1fs)", model_type, col, row[col], time.perf_counter() - t0)
    return row


def markdown(rows: dict[str, dict[str, str]], columns: list[str]) -> str:
    lines = ["| family | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for fam, row in rows.items():
        lines.append(f"| {fam} | " + " | ".join(row[c].replace("|", "\\|") for c in columns) + " |")
    totals = {c: Counter(row[c].split(" ")[0].rstrip(":") for row in rows.values()) for c in columns}
    lines.append("| **totals** | " + " | ".join(", ".join(f"{k} {v}" for k, v in sorted(totals[c].items()))
                                              for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(sorted(FAMILIES)))
    ap.add_argument("--columns", default=",".join(COLUMNS))
    ap.add_argument("--out", type=Path, help="write the markdown table here (default: stdout only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("qcompiler", "transformers", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    columns = [c for c in args.columns.split(",") if c]
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        ap.error(f"unknown column(s) {', '.join(unknown)}; choose from {', '.join(COLUMNS)}")
    rows: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="qc-table-") as tmp:
        calib = calib_text(Path(tmp))
        for fam in args.families.split(","):
            rows[fam] = family_row(fam, columns, calib)
    table = markdown(rows, columns)
    sys.stdout.write(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0 if all(not v.startswith("no") for row in rows.values() for v in row.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
