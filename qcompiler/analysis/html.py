"""``report.html``: one self-contained page (plots embedded as PNG ``data:`` URIs, no scripts from outside).

A tiny inline script marks ``<body data-plots="loaded/total">`` once the page has
loaded, counting ``img.plot`` elements that decoded to a non-empty image; the render
check (``tools/check_report_render.py``) reads it back from headless Chromium.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img.plot{max-width:100%;height:auto;border:1px solid #eee;display:block;margin:8px 0}
.note{color:#555;font-size:13px}.kv td{text-align:left}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0 && i.naturalHeight > 0) ok++; });
  document.body.setAttribute('data-plots', ok + '/' + imgs.length);
});
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x != x:
            return "–"
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"
    return _e(x)


def _table(headers: list[str], rows: list[list[object]], left: int = 1) -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{_fmt(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='plot' id='plot-{_e(name)}' alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def render(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """The HTML page of ``report`` with the PNGs ``plots`` (name → bytes)."""
    m, cal, out = report["model"], report["calibration"], report["outliers"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>qc analyze: {_e(m['path'])}</title>",
             f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>Quantization analysis</h1><p class='note'>{_e(m['path'])} — {m['num_layers']} decoder layers, "
             f"{m['linears']} linears ({m['params'] / 1e6:.1f} M weights), float size {m['float_mb']:.1f} MB. "
             f"Calibration: {_e(cal['source'])}, {cal['samples']} windows × {cal['seq_len']} tokens "
             f"({cal['rows']} rows sampled); layer reruns on {cal['block_windows']} × {cal['block_seq_len']} tokens. "
             f"qcompiler {_e(report['qcompiler_version'])}, report schema v{report['schema_version']}.</p>"]

    mixed = report["mixed"]
    int8 = out["llm_int8"]
    massive = out["massive"]
    parts.append("<h2>Summary</h2><table class='kv'>")
    summary = [
        ("LLM.int8 outlier dims", ", ".join(str(d["dim"]) for d in int8["dims"]) or "none"),
        ("massive activations", (f"dims {massive['dims']} at positions {massive['positions'][:10]}"
                                 if massive["dims"] or massive["positions"] else "none")),
        ("super weights", "; ".join(f"{s['linear']} W[{s['row']}, {s['col']}] = {s['weight']:.3g}"
                                    for s in out["super_weights"]) or "none"),
        ("most sensitive linears", ", ".join(report["ranking"][:5])),
        (f"mixed precision at {mixed['budget']:g} bits", f"{mixed['avg_bits']:.3f} average bits, "
                                                         f"{mixed['size_mb']:.1f} MB, predicted error "
                                                         f"{mixed['predicted_error']:.3g}"),
    ]
    if report["e2e"]["spearman"] is not None:
        summary.append(("predicted vs end-to-end (Spearman, top linears)", f"{report['e2e']['spearman']:.2f}"))
    parts.extend(f"<tr><th class='l'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary)
    parts.append("</table>")

    parts.append("<h2>Activation ranges</h2>" + _img("ranges", plots["ranges"], "activation ranges per layer"))
    parts.append("<h2>Outlier channels</h2>" + _img("heatmap", plots["heatmap"], "outlier channel heat map"))
    if int8["dims"]:
        parts.append(_table(["dim", "layer fraction", "mean token fraction", "max |x|"],
                            [[d["dim"], d["layer_fraction"], d["mean_token_fraction"], d["max_abs"]]
                             for d in int8["dims"]]))
    if massive["examples"]:
        parts.append("<p>Massive activations (examples):</p>" + _table(
            ["value", "window", "position", "dim", "x", "× median", "token"],
            [[e["value"], e["window"], e["position"], e["dim"], e["x"], e["ratio"], repr(e["token"])]
             for e in massive["examples"][:12]]))
    if out["super_weights"]:
        parts.append("<p>Super weights:</p>" + _table(
            ["linear", "row", "col", "weight", "|w|/std", "input spike", "output spike", "share"],
            [[s["linear"], s["row"], s["col"], s["weight"], s["weight_z"], s["input_spike"], s["output_spike"],
              s["contribution_share"]] for s in out["super_weights"]]))
    sev = sorted(out["severity"], key=lambda s: -s["ratio"])[:12]
    parts.append("<p>Most severe linear inputs (max|x|/std):</p>" + _table(
        ["value read by", "max|x|", "std", "ratio", "class", "kurtosis"],
        [[", ".join(s["linears"]), s["absmax"], s["std"], s["ratio"], s["class"], s["kurtosis"]] for s in sev]))

    parts.append("<h2>Sensitivity</h2>" + _img("sensitivity", plots["sensitivity"], "sensitivity bars"))
    ref = report["reference"]
    e2e = report["e2e"]
    if e2e["results"]:
        parts.append(f"<p class='note'>End-to-end check: {_e(e2e['candidate'])} on one linear at a time, KL of "
                     f"the final logits over {e2e['tokens']} tokens.</p>")
    parts.append("<h2>Error vs bits</h2>" + _img("error_vs_bits", plots["error_vs_bits"], "error vs bits"))
    parts.append("<h2>Size / accuracy</h2>" + _img("pareto", plots["pareto"], "size accuracy Pareto front"))
    parts.append(_table(["configuration", "avg bits", "size (MB)", "predicted error", "KL", "Pareto"],
                        [[p["label"], p["avg_bits"], p["size_mb"], p["predicted_error"],
                          p["kl"] if p.get("kl") is not None else float("nan"), "yes" if p.get("pareto") else ""]
                         for p in report["pareto"]]))
    layers = sorted(report["layers"], key=lambda r: r["rank"])
    cands = [c["name"] for c in report["candidates"]]
    rows = []
    for r in layers:
        rec = r["recommendation"]
        rows.append([r["key"], r["rank"], r["sensitivity"].get(ref, float("nan")), r["e2e_kl"] or float("nan"),
                     *[r["errors"][c]["snr_db"] for c in cands if c in r["errors"]],
                     rec["weight"], rec["activation"], rec["method"]])
    parts.append("<h2>Per-layer errors and recommendations</h2>" + _table(
        ["linear", "rank", f"S ({ref})", "KL", *[f"SNR {c} (dB)" for c in cands], "weights", "activations",
         "method"], rows))
    parts.append("</body></html>")
    return "\n".join(parts)
