#!/usr/bin/env python3
"""Which static activation quantizers cost the perplexity out of domain: one-at-a-time ablation.

    python tools/ood_ablate.py QDQ_MODEL_DIR --text KIND=PATH [--text ...] --out DIR \
        [--tokens 1024] [--seq-len 512] [--reference FLOAT_DIR]

``QDQ_MODEL_DIR`` is a static W8A8 model in the portable QDQ form (``--target npu``: every
quantized linear reads ``DequantizeLinear(QuantizeLinear(x))``).  Every per-tensor activation
quantizer ``x̂_i = DQ(Q(x_i))`` is rewritten as ``x_i + g_i·(x̂_i − x_i)`` with ``g`` a graph input,
so that one ONNX Runtime session evaluates any subset of the activations in float (``g_i = 0``)
or quantized (``g_i = 1``) without rebuilding: ``g = 1`` is the model as compiled, ``g = 0`` its
W8A16 form (int8 weights, float activations).

For each quantizer ``i`` (one per distinct linear input: q/k/v share one, gate/up share one)
the tool reports the perplexity and the KL divergence to the float model (``--reference``) with
``i`` alone kept in float (``gain_i``: how much of the whole loss that input's static range
causes) on every ``--text``, plus both end points, computed as ``qc eval`` computes them
(:func:`qcompiler.eval.evaluate_windows`: KL averaged over every position of a window).  Writes ``DIR/ablate.json`` and
``DIR/ablate.md`` sorted by the summed KL gain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_eval import DEFAULT_TEXTS, mid_windows, text_of

GATES = "qc_ablation_gates"


def gate_model(model_dir: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The model's proto with every static activation Q→DQ gated by ``GATES[i]``, and the quantizers' info."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name for t in g.initializer}
    quant: list[dict[str, Any]] = []
    new_nodes = []
    for n in list(g.node):
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue
        q = producer.get(n.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        readers = [c for c in consumers.get(n.output[0], []) if c.op_type in ("MatMul", "Gemm")]
        if not readers:
            continue
        i = len(quant)
        x, out = q.input[0], n.output[0]
        raw = f"{out}__raw"
        n.output[0] = raw
        idx = f"{GATES}_{i}_idx"
        proto.graph.initializer.append(numpy_helper.from_array(np.array(i, np.int64), idx))
        new_nodes += [
            helper.make_node("Gather", [GATES, idx], [f"{GATES}_{i}"]),
            helper.make_node("Sub", [raw, x], [f"{out}__d"]),
            helper.make_node("Mul", [f"{out}__d", f"{GATES}_{i}"], [f"{out}__gd"]),
            helper.make_node("Add", [x, f"{out}__gd"], [out]),
        ]
        meta = {p.key: p.value for p in readers[0].metadata_props}
        quant.append({"index": i, "value": x, "linears": [r.name for r in readers],
                      "layer": int(meta.get("qc.layer", -1)), "role": meta.get("qc.role")})
    g.node.extend(new_nodes)
    # an overridable initializer (listed as an input too): the runner's feeds need not know it
    g.initializer.append(numpy_helper.from_array(np.ones(len(quant), np.float32), GATES))
    g.input.append(helper.make_tensor_value_info(GATES, TensorProto.FLOAT, [len(quant)]))
    # node order: the appended nodes read values produced anywhere; sort topologically
    _toposort(g)
    return proto, quant


def _toposort(g: Any) -> None:
    produced = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    order, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                order.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise SystemExit(f"cannot order {len(rest)} nodes (first: {rest[0].name})")
        pending = rest
    del g.node[:]
    g.node.extend(order)


def session(proto: Any, model_dir: Path, threads: int | None) -> Any:
    from qcompiler.runtime import proto_session, session_options

    return proto_session(proto, session_options(threads, True, True), model_dir)


def score(logits_of: Any, windows: np.ndarray, ref: Any) -> tuple[float, float]:
    """(perplexity, mean KL(float ‖ model)) over the windows, as ``qc eval`` computes them
    (:func:`qcompiler.eval.evaluate_windows`)."""
    from qcompiler.eval import LogitsOf, evaluate_windows

    res = evaluate_windows(LogitsOf(logits_of), windows, ref, progress=False)
    return res.perplexity, float(res.kl or 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--reference", type=Path, required=True, help="the float model folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--text", action="append", default=[], help="KIND=PATH (repeatable; default: code and docs)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--all-but-one", action="store_true", help="also: only input i quantized (the rest float)")
    ap.add_argument("--groups", choices=("input", "layer-role", "role"), default="input",
                    help="input: one quantizer at a time; layer-role: each role (all layers) then each layer (all "
                         "roles); role: each role only")
    args = ap.parse_args(argv)

    from qcompiler.eval import LogitsOf, evaluate_windows
    from qcompiler.runtime import DecoderRunner, open_runner

    texts = ({k: [v] for k, v in (t.split("=", 1) for t in args.text)} if args.text
             else {k: DEFAULT_TEXTS[k] for k in ("code", "docs")})
    windows = {k: mid_windows(args.reference, text_of(p) or "", args.tokens, args.seq_len) for k, p in texts.items()}
    ref = open_runner(args.reference, threads=args.threads)
    # the float model's logits, once per window (every row compares against them)
    ref_logits = {np.asarray(ids, np.int64).tobytes(): ref.logits(ids) for w in windows.values() for ids in w}
    cached = LogitsOf(lambda ids: ref_logits[np.asarray(ids, np.int64).tobytes()])
    ref_ppl = {k: evaluate_windows(cached, w, progress=False).perplexity for k, w in windows.items()}
    del ref
    proto, quant = gate_model(args.model_dir)
    sess = session(proto, args.model_dir.resolve(), args.threads)
    runner = DecoderRunner(sess)
    n = len(quant)

    def evaluate(gates: np.ndarray) -> dict[str, tuple[float, float]]:
        def run(ids: np.ndarray) -> np.ndarray:
            feeds = runner.feeds(ids)
            feeds[GATES] = gates.astype(np.float32)
            return np.asarray(sess.run(["logits"], feeds)[0][0], np.float32)

        return {k: score(run, w, cached) for k, w in windows.items()}

    t0 = time.perf_counter()
    full = evaluate(np.ones(n))
    none = evaluate(np.zeros(n))
    print(f"all quantized {full}, all float {none} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    rows = []
    units: list[dict[str, Any]] = quant
    if args.groups in ("layer-role", "role"):
        keys = [(q["layer"], q["role"] or q["value"]) for q in quant]  # the first reader's qc.layer / qc.role
        roles = sorted({r for _, r in keys})
        layers = sorted({lay for lay, _ in keys})
        units = ([{"value": f"role {r}", "members": [i for i, k in enumerate(keys) if k[1] == r]} for r in roles]
                 + [{"value": f"layer {lay}", "members": [i for i, k in enumerate(keys) if k[0] == lay]} for lay in layers
                    if args.groups == "layer-role"])
    for q in units:
        g = np.ones(n)
        g[q.get("members", [q.get("index")])] = 0
        res = evaluate(g)
        row = {**q, "float_one": {k: {"ppl": p, "kl": kl} for k, (p, kl) in res.items()}}
        if args.all_but_one:
            g = np.zeros(n)
            g[q.get("members", [q.get("index")])] = 1
            row["quant_one"] = {k: {"ppl": p, "kl": kl} for k, (p, kl) in evaluate(g).items()}
        row["kl_gain"] = sum(full[k][1] - res[k][1] for k in windows)
        rows.append(row)
        print(f"{q['value'][:60]:60s} " + " ".join(
            f"{k} ppl {res[k][0]:.3f} kl {res[k][1]:.4f}" for k in windows), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"model": str(args.model_dir), "texts": texts, "tokens": args.tokens, "fp32": ref_ppl,
           "all_quantized": full, "all_float": none, "rows": rows}
    (args.out / "ablate.json").write_text(json.dumps(doc, indent=1))
    kinds = list(windows)
    lines = [f"model {args.model_dir}; {args.tokens} tokens per text from a third of the document on", "",
             "| input | " + " | ".join(f"{k} Δppl% one float (KL)" for k in kinds) + " | KL gain (sum) |",
             "|---|" + "---|" * (len(kinds) + 1),
             "| all quantized | " + " | ".join(f"{100 * (full[k][0] / ref_ppl[k] - 1):+.2f} ({full[k][1]:.4f})"
                                             for k in kinds) + " | — |",
             "| all float (W8A16) | " + " | ".join(f"{100 * (none[k][0] / ref_ppl[k] - 1):+.2f} ({none[k][1]:.4f})"
                                                 for k in kinds) + " | — |"]
    for r in sorted(rows, key=lambda r: -r["kl_gain"]):
        f = r["float_one"]
        lines.append(f"| {r['value']} | " + " | ".join(
            f"{100 * (f[k]['ppl'] / ref_ppl[k] - 1):+.2f} ({f[k]['kl']:.4f})" for k in kinds)
            + f" | {r['kl_gain']:.4f} |")
    (args.out / "ablate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:30]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
