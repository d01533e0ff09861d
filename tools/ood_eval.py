#!/usr/bin/env python3
"""Out-of-domain evaluation: calibrate on one text, evaluate every recipe on texts of other kinds.

    python tools/ood_eval.py MODEL_DIR --calib CALIB.txt --out DIR \
        [--recipes w8a8-static,w8a8-static-smooth,w8a8-static-rotate] [--targets cpu,npu] \
        [--text KIND=PATH ...] [--tokens 2048] [--seq-len 512]

Static activation ranges are calibrated on one text and deployed on everything else, so a
static recipe is only as good as its worst unseen domain.  Each recipe × target is compiled
once (``qc quantize`` in a child process: its wall time and peak RSS are its own) on
``--calib``, then evaluated against the float model on every ``--text`` (perplexity, Δ%, KL,
top-1 agreement).  Evaluation windows start in the middle of each document (tokens from
``len/3`` on), not at its title or licence header, so they are text the calibration never saw.

Default texts (the calibration text is the GPL-3, legal English):

* ``prose``  — other licences (Apache-2.0, MPL-2.0, Artistic): near the calibration domain, a control;
* ``docs``   — Vim's reference manual (``pattern.txt``): technical documentation;
* ``code``   — Python source (the standard library's ``argparse.py``);
* ``relnotes`` — git release notes 2.4x: terse change logs with command names and options.

Writes ``DIR/rows.json`` and ``DIR/table.md`` (one row per recipe × target, one Δ% column per
text, and the worst).  Texts that do not exist on the machine are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TEXTS = {
    "prose": ["/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0",
              "/usr/share/common-licenses/Artistic"],
    "docs": ["/usr/share/vim/vim90/doc/pattern.txt"],
    "code": [f"/usr/lib/python3.{v}/argparse.py" for v in (11, 12, 10)],
    "relnotes": sorted(str(p) for p in Path("/usr/share/doc/git/RelNotes").glob("2.4*.txt")),
}
STATIC_RECIPES = "w8a8-static,w8a8-static-smooth"


def text_of(paths: list[str]) -> str | None:
    """The concatenation of the existing files of ``paths`` (the first one for ``code``-like lists)."""
    found = [p for p in paths if Path(p).is_file()]
    if not found:
        return None
    return "\n\n".join(Path(p).read_text(errors="replace") for p in found)


def mid_windows(model_dir: Path, text: str, tokens: int, seq_len: int) -> np.ndarray:
    """``tokens // seq_len`` windows of ``seq_len`` starting at a third of the document."""
    from qcompiler.data import tokenize

    ids = tokenize(model_dir, text)
    start = len(ids) // 3
    if len(ids) - start < tokens:
        start = max(0, len(ids) - tokens)
    n = min(tokens, len(ids) - start) // seq_len
    if n == 0:
        raise SystemExit(f"text too short for one window of {seq_len} tokens")
    return ids[start:start + n * seq_len].reshape(n, seq_len)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_child(cmd: list[str], label: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run one compile in a child process: the row's status and command, and on success its wall and CPU seconds."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        return proc, {"status": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
                      "command": label}
    return proc, {"status": "ok", "command": label, "compile_s": round(wall, 1), "compile_cpu_s": round(cpu, 1)}


#: ``--recipes ort-rtn``: ONNX Runtime's own ``MatMulNBitsQuantizer`` (RTN int4, g128 asymmetric, no calibration)
#: on the same float graph, for a baseline row next to qcompiler's recipes; it reports its own peak RSS.
ORT_RTN = "ort-rtn"


def compile_ort_rtn(model: Path, out: Path, group_size: int = 128) -> dict[str, Any]:
    """ORT's RTN in a child process; the model's other files (config, tokenizer) are copied alongside."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_compile import ORT_CHILD

    shutil.rmtree(out, ignore_errors=True)
    child = ORT_CHILD + "\nimport resource\nprint('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    cmd = [sys.executable, "-c", child, str(model), str(out), str(group_size), "0"]
    proc, row = _run_child(cmd, f"MatMulNBitsQuantizer(block_size={group_size}, is_symmetric=False)")
    if row["status"] != "ok":
        return row
    for f in model.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    peak = next((float(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_MB")), None)
    return {**row, "peak_rss_mb": round(peak) if peak else None, "kept_float": []}


def compile_row(model: Path, out: Path, recipe: str, target: str, calib: str, extra: list[str],
                passes: str | None = None) -> dict[str, Any]:
    from qcompiler.recipes import get_recipe

    if recipe == ORT_RTN:
        return compile_ort_rtn(model, out)

    how = ["--passes", passes] if passes else ["--recipe", recipe]
    data = ["--calib", calib] if passes or get_recipe(recipe).needs_calibration else []  # (refused by the others)
    cmd = [sys.executable, "-m", "qcompiler", "quantize", str(model), str(out), *how,
           "--target", target, *data, "--force", *extra]
    _, row = _run_child(cmd, " ".join(cmd))
    if row["status"] != "ok":
        return row
    q = json.loads((out / "quantization.json").read_text())
    return {**row, "peak_rss_mb": q.get("peak_rss_mb"), "kept_float": q.get("kept_float", [])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--calib", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipes", default=STATIC_RECIPES)
    ap.add_argument("--targets", default="cpu,npu")
    ap.add_argument("--row", action="append", default=[],
                    help="NAME=PIPELINE: an extra row compiled with qc quantize --passes PIPELINE (repeatable)")
    ap.add_argument("--text", action="append", default=[], help="KIND=PATH (repeatable; replaces the defaults)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens scored per text (default 2048)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--extra", default="", help="extra qc quantize arguments, space-separated")
    ap.add_argument("--reuse", action="store_true", help="reuse compiled models already under OUT/models")
    args = ap.parse_args(argv)

    from qcompiler.eval import evaluate_windows
    from qcompiler.runtime import open_runner

    texts = {k: [v] for k, v in (t.split("=", 1) for t in args.text)} if args.text else DEFAULT_TEXTS
    windows: dict[str, np.ndarray] = {}
    for kind, paths in texts.items():
        body = text_of(paths)
        if body is None:
            print(f"skip {kind}: none of {paths} exists", file=sys.stderr)
            continue
        windows[kind] = mid_windows(args.model_dir, body, args.tokens, args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    ref = open_runner(args.model_dir, threads=args.threads)
    ref_ppl: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    custom = dict(r.split("=", 1) for r in args.row)
    for recipe in [*filter(None, args.recipes.split(",")), *custom]:
        for target in filter(None, args.targets.split(",")):
            out = args.out / "models" / f"{recipe}-{target}"
            if args.reuse and (out / "quantization.json").is_file():
                q = json.loads((out / "quantization.json").read_text())
                row = {"status": "ok", "compile_s": q.get("wall_seconds"), "peak_rss_mb": q.get("peak_rss_mb")}
            elif args.reuse and recipe == ORT_RTN and (out / "model.onnx").is_file():
                row = {"status": "ok", "compile_s": None, "peak_rss_mb": None}
            else:
                row = compile_row(args.model_dir, out, recipe, target, args.calib, args.extra.split(), custom.get(recipe))
            row.update(recipe=recipe, target=target, texts={},
                       size_mb=round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6, 1))
            print(f"{recipe} {target}: {row['status']}", file=sys.stderr, flush=True)
            if row["status"] == "ok":
                runner = open_runner(out, threads=args.threads)
                for kind, win in windows.items():
                    res = evaluate_windows(runner, win, ref, str(out), str(args.model_dir), progress=False)
                    ref_ppl[kind] = res.reference_perplexity  # type: ignore[assignment]
                    row["texts"][kind] = {"perplexity": res.perplexity, "kl": res.kl, "top1": res.top1_agreement,
                                          "delta_pct": 100 * (res.perplexity / res.reference_perplexity - 1)}
                    print(f"  {kind}: ppl {res.perplexity:.3f} (fp32 {res.reference_perplexity:.3f}) "
                          f"{row['texts'][kind]['delta_pct']:+.2f}% KL {res.kl:.4f}", file=sys.stderr, flush=True)
                del runner
            rows.append(row)
            (args.out / "rows.json").write_text(json.dumps({"calib": args.calib, "texts": texts,
                                                            "fp32": ref_ppl, "rows": rows}, indent=1))
    kinds = list(windows)
    lines = [f"calibration: {args.calib}; {args.tokens} tokens per text from a third of the document on, "
             f"windows of {args.seq_len}", "",
             "| recipe | target | " + " | ".join(f"{k} Δ% (KL)" for k in kinds) + " | worst Δ% | size MB | compile s | peak RSS MB |",
             "|---|---|" + "---|" * (len(kinds) + 4),
             "| fp32 | — | " + " | ".join(f"ppl {ref_ppl.get(k, float('nan')):.3f}" for k in kinds)
             + f" | — | {sum(f.stat().st_size for f in args.model_dir.glob('model.onnx*')) / 1e6:.1f} | — | — |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['recipe']} | {r['target']} | {r['status']} |")
            continue
        t = r["texts"]
        worst = max(t[k]["delta_pct"] for k in kinds)
        lines.append(f"| {r['recipe']} | {r['target']} | "
                     + " | ".join(f"{t[k]['delta_pct']:+.2f} ({t[k]['kl']:.3f})" for k in kinds)
                     + f" | **{worst:+.2f}** | {r.get('size_mb')} | {r['compile_s']} | {r['peak_rss_mb']} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
