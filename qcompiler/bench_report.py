"""The report of ``qc bench``: the markdown table, the perplexity-vs-size plot, the files.

``bench.md`` is what the table shows, ``bench.json`` everything (``BenchResult.to_dict``;
``BenchResult.from_dict`` reads it back, so a report can be re-rendered without
re-running), ``bench.png`` perplexity (log scale) against size on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from qcompiler.artifact import write_json
from qcompiler.bench import BenchResult, BenchRow


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _compile_cell(r: BenchRow) -> str:
    if r.compile_s is None:
        return "—"
    return f"{r.compile_s:.1f}" + (f" ({r.compile_cpu_s:.1f})" if r.compile_cpu_s is not None else "")


def _total_cpu(result: BenchResult) -> float:
    return sum(r.row_cpu_s or 0.0 for r in result.rows)


def render_markdown(result: BenchResult) -> str:
    cfg, env = result.config, result.environment
    contexts = [str(c) for c in cfg.decode_contexts] if cfg.context_decode_tokens > 0 else []
    head = (
        "| row | status | perplexity | Δ% | KL | top-1 | size MB | compile s (CPU s) | compile peak RSS MB "
        "| prefill tok/s | decode tok/s | cache B/token |" + "".join(f" decode tok/s @{c} |" for c in contexts)
    )
    lines = [
        f"# qc bench: {Path(result.model).name}",
        "",
        head,
        "|" + "---|" * (12 + len(contexts)),
    ]
    for r in result.rows:
        lines.append(
            f"| {r.name} | {r.status_text()} | {_fmt(r.perplexity, '.3f')} | {_fmt(r.delta_pct, '+.2f')} "
            f"| {_fmt(r.kl, '.4f')} | {_fmt(r.top1, '.4f')} "
            f"| {_fmt(r.size_bytes / 1e6 if r.size_bytes is not None else None, '.1f')} "
            f"| {_compile_cell(r)} | {_fmt(r.compile_peak_rss_mb, '.0f')} "
            f"| {_fmt(r.prefill_tok_s, '.1f')} | {_fmt(r.decode_tok_s, '.2f')} "
            f"| {_fmt(r.cache_bytes_per_token, 'd')} |"
            + "".join(f" {_fmt((r.decode_tok_s_at or {}).get(c), '.2f')} |" for c in contexts)
        )
    n_windows = max(1, cfg.eval_tokens // cfg.seq_len)
    lines += [
        "",
        f"Text: `{result.text}`, first {cfg.eval_tokens} tokens ({n_windows} windows of {cfg.seq_len}); "
        f"calibration: `{result.calib or 'none'}` ({result.options.get('calib_samples')} windows). "
        f"Group size {result.options.get('group_size')}.",
        f"Speed: ONNX Runtime {env.get('onnxruntime')} CPU, {env.get('threads')} threads "
        f"(spinning {'on' if env.get('spin') else 'off'}), prefill {cfg.prefill_tokens} tokens "
        f"(median of {cfg.prefill_repeats}), decode {cfg.decode_tokens} greedy tokens with the KV cache; "
        f"decode @N: {cfg.context_decode_tokens} steps on a cache of N tokens (random entries of the cache's type).",
        f"Load average at start/end: {env.get('loadavg_start')}/{env.get('loadavg_end')} on "
        f"{env.get('cpu_count')} cores (a load above the thread count means timings are contended). "
        f"Wall time {result.wall_s:.0f} s; CPU time of all rows {_total_cpu(result):.0f} s "
        f"(load average when each row started: {', '.join(_fmt(r.loadavg, 'g') for r in result.rows)}).",
        "",
        "Rows:",
    ]
    lines += [f"- `{r.name}`: {r.description}" + (f" — `{r.pipeline}`" if r.pipeline else "") for r in result.rows]
    return "\n".join(lines) + "\n"


def plot(result: BenchResult, path: Path) -> None:
    """Perplexity (log scale) against size on disk, one labelled point per row that succeeded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {
        "reference": {"marker": "*", "color": "black", "label": "float"},
        "recipe": {"marker": "o", "color": "tab:blue", "label": "qcompiler"},
        "anchor": {"marker": "s", "facecolors": "none", "edgecolors": "tab:orange", "label": "ONNX Runtime"},
        "folder": {"marker": "D", "color": "tab:green", "label": "model folder (dir:)"},
    }
    seen: set[str] = set()
    ok = [r for r in result.rows if r.ok and r.perplexity is not None and r.size_bytes is not None]
    for i, r in enumerate(ok):
        st = dict(styles[r.kind])
        if r.kind in seen:
            st.pop("label")
        seen.add(r.kind)
        x, y = r.size_bytes / 1e6, r.perplexity  # type: ignore[operator]
        ax.scatter(x, y, s=70 if r.kind != "recipe" else 45, zorder=3 if r.kind == "recipe" else 2, **st)
        # alternate label offsets so rows at nearly the same point stay readable
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(6, 8 - 12 * (i % 3)), fontsize=7)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(f"{Path(result.model).name}: perplexity vs size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: BenchResult, folder: Path, with_plot: bool = True) -> None:
    """``bench.json``, ``bench.md`` and (``with_plot``) ``bench.png`` in ``folder``, each written atomically."""
    write_json(folder / "bench.json", result.to_dict())
    md = folder / "bench.md"
    tmp = md.with_name(".bench.md.tmp")
    tmp.write_text(result.to_markdown())
    os.replace(tmp, md)
    if with_plot:
        plot(result, folder / "bench.png")
