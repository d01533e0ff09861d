"""Static activation ranges out of domain: which linear inputs leave their calibrated range on another text.

A static W8A8 model quantizes each linear's input ``X`` with one range fixed at calibration,
``[min_cal, max_cal]`` over the calibration windows.  On another text a token ``t`` whose row
leaves that range is clipped; its overshoot is::

    r_t = max(max_c X[t, c] / max_cal, min_c X[t, c] / min_cal)     (> 1: clipped)

For every distinct linear input this reports the calibrated range (and the channel that set
it), the largest ``r_t`` on the second text, the fraction of its tokens with ``r_t > 1``, the
fraction of the input's energy that falls outside the range (``Σ (|x| − clip)² / Σ x²``, what
clipping costs), the whole static uint8 error on the second text
(``‖x − Q(x)‖²/‖x‖²`` with ``s = (hi − lo)/255``, ``z = round(−lo/s)``, ``lo ≤ 0 ≤ hi``: rounding
and clipping together), and the ``top`` tokens that overshoot most (position, token text, channel).
Both texts run through ONNX Runtime with the linear inputs added as graph outputs, one window
at a time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.irutil import load_model

log = logging.getLogger(__name__)


@dataclass
class _Acc:
    lo: float = np.inf
    hi: float = -np.inf
    lo_ch: int = -1
    hi_ch: int = -1


def _inputs(model_path: Path) -> dict[str, list[str]]:
    """Distinct decoder-linear input value → the linear keys reading it (canonicalize's roles)."""
    from qcompiler.canonical import canonical_summary
    from qcompiler.spec import linear_info

    model = load_model(model_path)
    summary = canonical_summary(model)
    out: dict[str, list[str]] = {}
    for key, node in summary.linears.items():
        info = linear_info(node)
        if info is None or info.layer < 0 or node.inputs[0] is None:
            continue
        out.setdefault(node.inputs[0].name, []).append(key)
    return out


def _session(model_dir: Path, names: list[str], threads: int | None) -> Any:
    import onnx

    from qcompiler.runtime import proto_session, session_options

    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for n in names:
        if n not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=n))
    return proto_session(proto, session_options(threads, True, True), model_dir)


def range_shift(model_dir: str | os.PathLike, calib_ids: np.ndarray, text_ids: np.ndarray,
                threads: int | None = None, top: int = 5) -> dict[str, Any]:
    """Calibrated per-tensor ranges of every decoder-linear input on ``calib_ids`` windows, and how the
    ``text_ids`` windows leave them (module docstring)."""
    from qcompiler.data import load_tokenizer
    from qcompiler.runtime import DecoderRunner

    folder = Path(model_dir).resolve()
    readers = _inputs(folder / "model.onnx")
    names = list(readers)
    sess = _session(folder, names, threads)
    runner = DecoderRunner(sess)
    acc = {n: _Acc() for n in names}
    for ids in calib_ids:
        for n, x in zip(names, sess.run(names, runner.feeds(ids))):
            x2 = x.reshape(-1, x.shape[-1])
            cmax, cmin = x2.max(axis=0), x2.min(axis=0)
            a = acc[n]
            if cmax.max() > a.hi:
                a.hi, a.hi_ch = float(cmax.max()), int(cmax.argmax())
            if cmin.min() < a.lo:
                a.lo, a.lo_ch = float(cmin.min()), int(cmin.argmin())
    tok = load_tokenizer(folder)
    over: dict[str, list[tuple[float, int, int, int]]] = {n: [] for n in names}  # (r, window, pos, channel)
    clipped_energy = dict.fromkeys(names, 0.0)
    energy = dict.fromkeys(names, 0.0)
    exceed = dict.fromkeys(names, 0)
    qerr = dict.fromkeys(names, 0.0)
    tokens = 0
    for w, ids in enumerate(text_ids):
        outs = sess.run(names, runner.feeds(ids))
        tokens += len(ids)
        for n, x in zip(names, outs):
            a = acc[n]
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            hi = a.hi if a.hi > 0 else np.inf
            lo = a.lo if a.lo < 0 else -np.inf
            r = np.maximum(x2.max(axis=1) / hi, x2.min(axis=1) / lo)
            exceed[n] += int((r > 1).sum())
            outside = np.clip(x2 - a.hi, 0, None) + np.clip(a.lo - x2, 0, None)
            clipped_energy[n] += float((outside**2).sum())
            energy[n] += float((x2**2).sum())
            lo_q, hi_q = min(a.lo, 0.0), max(a.hi, 0.0)
            sc = (hi_q - lo_q) / 255.0 or 1.0
            z = np.round(-lo_q / sc)
            xq = (np.clip(np.round(x2 / sc) + z, 0, 255) - z) * sc
            qerr[n] += float(((x2 - xq) ** 2).sum())
            worst = np.argsort(-r)[:top]
            for p in worst:
                if r[p] > 1:
                    ch = int(np.argmax(np.maximum(x2[p] / hi, x2[p] / lo)))
                    over[n].append((float(r[p]), w, int(p), ch))
    entries = []
    for n in names:
        a = acc[n]
        best = sorted(over[n], reverse=True)[:top]
        entries.append({
            "value": n,
            "linears": readers[n],
            "calibrated": {"min": a.lo, "max": a.hi, "min_channel": a.lo_ch, "max_channel": a.hi_ch},
            "max_overshoot": best[0][0] if best else max(0.0, 0.0),
            "tokens_outside": exceed[n] / max(tokens, 1),
            "clipped_energy": clipped_energy[n] / max(energy[n], 1e-30),
            "static_uint8_error": qerr[n] / max(energy[n], 1e-30),
            "worst_tokens": [{"overshoot": r, "window": w, "position": p, "channel": c,
                              "token": tok.decode([int(text_ids[w, p])]),
                              "context": tok.decode([int(i) for i in text_ids[w, max(0, p - 6):p + 1]])}
                             for r, w, p, c in best],
        })
    entries.sort(key=lambda e: -e["static_uint8_error"])
    return {"tokens": tokens, "calibration_tokens": int(calib_ids.size), "inputs": entries}


def format_table(result: dict[str, Any], rows: int = 15) -> str:
    """The ``rows`` inputs with the largest static uint8 error on the second text, as a Markdown table."""
    lines = ["| linears | calibrated [min, max] (channel) | max overshoot | tokens outside | clipped energy "
             "| static uint8 error | worst token |",
             "|---|---|---|---|---|---|---|"]
    for e in result["inputs"][:rows]:
        c = e["calibrated"]
        w = e["worst_tokens"][0] if e["worst_tokens"] else None
        worst = f"{w['context']!r} (pos {w['position']}, ch {w['channel']})" if w else "—"
        lines.append(f"| {','.join(e['linears'])} | [{c['min']:.3g}, {c['max']:.3g}] (ch {c['max_channel']}) | "
                     f"{e['max_overshoot']:.2f}× | {100 * e['tokens_outside']:.2f}% | {e['clipped_energy']:.2e} | "
                     f"{e['static_uint8_error']:.2e} | "
                     f"{worst.replace('|', '/')} |")
    return "\n".join(lines)
