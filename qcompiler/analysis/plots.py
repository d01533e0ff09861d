"""The report's plots, drawn with matplotlib's object API (no pyplot state, no display) as PNG bytes.

Each function takes plain data from the report (and, for the heat map, the per-channel
outlier fractions) and returns a PNG; :mod:`qcompiler.analysis.html` embeds them as
``data:`` URIs so ``report.html`` is one self-contained file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

ROLE_COLORS = {
    "q_proj": "#4e79a7", "k_proj": "#76b7b2", "v_proj": "#59a14f", "o_proj": "#edc948",
    "gate_proj": "#f28e2b", "up_proj": "#e15759", "down_proj": "#b07aa1", "qkv_proj": "#4e79a7",
    "gate_up_proj": "#f28e2b", "lm_head": "#9c755f",
}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return buf.getvalue()


def activation_ranges(severity: Sequence[dict[str, Any]], massive: Sequence[dict[str, Any]]) -> bytes:
    """max|x| and std of each linear input per layer, and the residual stream's max and median."""
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    kinds: dict[str, list[tuple[int, float, float]]] = {}
    for s in severity:
        kind = s["linears"][0].split(".")[-1] if s["linears"] else s["value"]
        kinds.setdefault(kind, []).append((s["layer"], s["absmax"], s["std"]))
    for kind, pts in kinds.items():
        pts.sort()
        layers = [p[0] for p in pts]
        color = ROLE_COLORS.get(kind, "#555555")
        label = {"q_proj": "attention in", "o_proj": "o_proj in", "gate_proj": "MLP in", "down_proj": "down_proj in"}
        ax1.plot(layers, [p[1] for p in pts], "-o", ms=3, color=color, label=f"{label.get(kind, kind)} max|x|")
        ax1.plot(layers, [p[2] for p in pts], "--", color=color, alpha=0.6)
    ax1.set_yscale("log")
    ax1.set_xlabel("decoder layer")
    ax1.set_title("linear inputs: max|x| (solid), std (dashed)")
    ax1.legend(fontsize=7)
    if massive:
        xs = np.arange(len(massive))
        ax2.semilogy(xs, [m["max_abs"] for m in massive], "-o", ms=3, color="#e15759", label="max|x|")
        ax2.semilogy(xs, [max(m["median_abs"], 1e-6) for m in massive], "-", color="#4e79a7", label="median|x|")
        ax2.semilogy(xs, [m["limit"] for m in massive], ":", color="#333333", label="massive limit")
        step = max(1, len(massive) // 10)
        ax2.set_xticks(xs[::step], [m["value"].replace("layers.", "") for m in massive][::step], rotation=45,
                       fontsize=7)
        ax2.legend(fontsize=7)
    ax2.set_title("residual stream")
    return _png(fig)


def outlier_heatmap(fraction: np.ndarray, labels: Sequence[str], dims: Sequence[int], threshold: float) -> bytes:
    """Fraction of tokens with |x| ≥ threshold, per hidden-state input (rows) and dim (columns)."""
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    data = fraction if fraction.size else np.zeros((1, 1))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=max(0.1, data.max()))
    fig.colorbar(im, ax=ax, label=f"fraction of tokens with |x| ≥ {threshold:g}")
    ax.set_xlabel("hidden dim")
    ax.set_ylabel("layer input")
    step = max(1, len(labels) // 12)
    ax.set_yticks(range(0, len(labels), step), list(labels)[::step], fontsize=7)
    for d in dims:
        ax.axvline(d, color="#00d0ff", lw=0.6, alpha=0.5)
    ax.set_title("outlier channels" + (f" (LLM.int8 dims: {', '.join(map(str, dims[:12]))})" if dims else ""))
    return _png(fig)


def sensitivity_bars(layers: Sequence[dict[str, Any]], reference: str, top: int = 30) -> bytes:
    """Predicted layer-output error of the most sensitive linears, and measured KL where checked."""
    ranked = sorted(layers, key=lambda r: r["rank"])[:top]
    fig = Figure(figsize=(10, max(3.0, 0.22 * len(ranked) + 1)))
    ax = fig.subplots()
    ys = np.arange(len(ranked))[::-1]
    vals = [max(r["sensitivity"].get(reference, 0.0), 1e-12) for r in ranked]
    ax.barh(ys, vals, color=[ROLE_COLORS.get(r["role"], "#777777") for r in ranked])
    ax.set_yticks(ys, [r["key"] for r in ranked], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"predicted layer-output error S ({reference})")
    kl = [(y, r["e2e_kl"]) for y, r in zip(ys, ranked) if r.get("e2e_kl") is not None]
    if kl:
        ax2 = ax.twiny()
        ax2.plot([max(k, 1e-12) for _, k in kl], [y for y, _ in kl], "k*", ms=7, label="end-to-end KL")
        ax2.set_xscale("log")
        ax2.set_xlabel("end-to-end KL (★)")
    ax.set_title(f"sensitivity ranking (top {len(ranked)})", loc="left")
    return _png(fig)


def error_vs_bits(curve: Sequence[dict[str, Any]], points: Sequence[dict[str, Any]]) -> bytes:
    """Local SNR per candidate vs bits per weight; model-level error vs average bits."""
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    pts = sorted(curve, key=lambda c: c["bits_per_weight"])
    if pts:
        x = [c["bits_per_weight"] for c in pts]
        med = np.array([c["median_snr_db"] for c in pts])
        lo = med - np.array([c["p10_snr_db"] for c in pts])
        hi = np.array([c["p90_snr_db"] for c in pts]) - med
        ax1.errorbar(x, med, yerr=[lo, hi], fmt="-o", capsize=3, color="#4e79a7")
        for c in pts:
            ax1.annotate(c["candidate"], (c["bits_per_weight"], c["median_snr_db"]), fontsize=7,
                         xytext=(3, -10), textcoords="offset points")
    ax1.set_xlabel("bits per weight")
    ax1.set_ylabel("local output SNR (dB), median and 10–90%")
    ax1.set_title("per-linear error vs bits")
    for kind, marker, color in (("mixed", "-o", "#e15759"), ("uniform", "s", "#4e79a7")):
        sel = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["avg_bits"])
        if not sel:
            continue
        use_kl = all(p.get("kl") is not None for p in sel)
        ys = [max(p["kl"] if use_kl else p["predicted_error"], 1e-12) for p in sel]
        ax2.plot([p["avg_bits"] for p in sel], ys, marker, color=color,
                 label=f"{kind} ({'KL' if use_kl else 'predicted error'})")
        for p, y in zip(sel, ys):
            ax2.annotate(p["label"], (p["avg_bits"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_yscale("log")
    ax2.set_xlabel("average bits per weight")
    ax2.set_title("model error vs bits")
    ax2.legend(fontsize=7)
    return _png(fig)


def pareto_front(points: Sequence[dict[str, Any]]) -> bytes:
    """Model size vs error of uniform and mixed configurations, the non-dominated ones joined."""
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    use_kl = bool(points) and all(p.get("kl") is not None for p in points)
    key = "kl" if use_kl else "predicted_error"
    for kind, marker, color in (("uniform", "s", "#4e79a7"), ("mixed", "o", "#e15759")):
        sel = [p for p in points if p["kind"] == kind]
        ax.scatter([p["size_mb"] for p in sel], [max(p[key], 1e-12) for p in sel], marker=marker, color=color,
                   label=kind, zorder=3)
        for p in sel:
            ax.annotate(p["label"], (p["size_mb"], max(p[key], 1e-12)), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["size_mb"])
    if front:
        ax.plot([p["size_mb"] for p in front], [max(p[key], 1e-12) for p in front], "-", color="#333333",
                lw=1, label="Pareto front", zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("end-to-end KL" if use_kl else "predicted error")
    ax.set_title("size / accuracy")
    ax.legend(fontsize=7)
    return _png(fig)
