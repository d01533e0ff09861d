"""``qc quantize``: model folder → passes → target lowering → quantized model folder.

The output folder holds the model (``model.onnx`` + ``model.onnx_data``), the
tokenizer and configs copied from the input, and ``quantization.json`` saying what
was done (recipe, the exact pipeline, per-pass timing, per-layer specs, what stayed
in float, wall time and peak memory).  It is written atomically: everything, the
passes' scratch included, happens in a temporary sibling folder that is renamed into
place at the end.  Large tensors the passes create are spilled to that scratch
(``irutil.SpillStore``) so memory holds a few tensors at a time, not the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qcompiler import __version__, coverage
from qcompiler.artifact import (
    MODEL_FILE,
    atomic_output_dir,
    check_not_overlapping,
    check_output_dir,
    copy_side_files,
    open_model_dir,
    write_json,
)
from qcompiler.distributed import Executor
from qcompiler.errors import OptionError, QCError, UnsupportedModelError
from qcompiler.finite import check_model_weights
from qcompiler.floattype import file_float_type
from qcompiler.irutil import SpillStore, attach_spill, load_model, save_model, unknown_ops
from qcompiler.memory import peak_rss_mb
from qcompiler.option_use import applied_options
from qcompiler.pipeline import (
    PassContext,
    get_pass,
    parse_pipeline,
    pipeline_text,
    run_passes,
    split_pipeline,
)
from qcompiler.quant.intgemm import integer_gemms, saturation_problem
from qcompiler.recipes import QuantizeOptions, get_recipe
from qcompiler.shapes import record_shapes
from qcompiler.targets import check_target, lowering_pipeline

log = logging.getLogger(__name__)

SPILL_DIR = ".scratch"
SCOPE_NOTE = (
    "decoder linear layers are quantized, except those listed in kept_float with their reason; token "
    "embeddings, attention score MatMuls and the KV cache stay in float unless an option says otherwise "
    "(--kv-cache: report.kv_cache)"
)


#: The fp16 overflow guard every recipe runs on an fp16 graph with ``--calib`` (passes/keep_fp32.py),
#: right after ``canonicalize``: before any pass quantizes, so a kept linear is quantized in float32.
HALF_GUARD = "keep-fp32"
#: ``--rotate``: the residual-stream rotation (passes/rotate.py) put in front of any recipe that has none.
ROTATE_STEP = "rotate"


def _after_canonicalize(text: str, step: str) -> str:
    """``step`` right after the pipeline's ``canonicalize`` (or first, if it has none)."""
    head, sep, tail = text.partition("canonicalize")
    return f"{head}canonicalize,{step}{tail}" if sep else f"{step},{text}"


def build_pipeline_text(recipe: str | None, passes: str | None, options: QuantizeOptions, lower: bool = True,
                        fp16: bool = False) -> str:
    """The recipe's (or ``--passes``') pipeline plus the target's lowering; with ``fp16`` (the graph is
    fp16) and a calibration text, a recipe gets :data:`HALF_GUARD` after its ``canonicalize``."""
    if bool(recipe) == bool(passes):
        raise QCError("give exactly one of --recipe NAME or --passes PIPELINE")
    check_target(options.target)
    text = get_recipe(recipe).build(options) if recipe else str(passes)
    if recipe and fp16 and options.calib and HALF_GUARD not in text:
        text = _after_canonicalize(text, HALF_GUARD)
    if options.rotate:
        if not recipe:
            raise OptionError("--rotate goes with --recipe; with --passes, write rotate{...} in the pipeline")
        if any(name == ROTATE_STEP for name, _ in split_pipeline(text)):
            raise OptionError(f"--rotate: recipe '{recipe}' rotates already (its pipeline: {text})")
        text = _after_canonicalize(text, ROTATE_STEP)  # before keep-fp32: the guard sees the rotated values
    if lower:
        tail = lowering_pipeline(options.target, options)
        if tail:
            text = f"{text},{tail}"
    return text


def check_integer_gemms(model: ir.Model, cpu_isa: str) -> dict[str, int]:
    """The invariant after lowering: no integer GEMM that saturates on x86 CPUs without VNNI
    (u8 × int8 outside [−64, 63]) unless the user declared ``--cpu-isa vnni``; returns the
    count of each GEMM form for ``quantization.json``."""
    gemms = integer_gemms(model)
    problem = saturation_problem(gemms, cpu_isa)
    if problem:
        raise QCError(problem)
    forms = Counter(f"{g.op} {g.form}" + ("" if g.safe else " (VNNI/AMX/ARM CPUs only)") for g in gemms)
    return dict(sorted(forms.items()))


def make_context(in_dir: Path, options: QuantizeOptions, workdir: Path | None = None,
                 executor: Executor | None = None) -> PassContext:
    ctx = PassContext(workdir=workdir, options=asdict(options), executor=executor or Executor())
    if options.calib:
        from qcompiler.calibrate import make_calibrator  # the calibration engine

        ctx.calibrate = make_calibrator(in_dir, options, ctx.executor)
    return ctx


def quantize(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: str | None = None,
    passes: str | None = None,
    options: QuantizeOptions | None = None,
    force: bool = False,
    dump_ir: str | os.PathLike | None = None,
    genai: bool = False,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Quantize the model folder ``in_dir`` into ``out_dir``; returns ``quantization.json``'s content.

    With ``genai`` the folder also gets ``genai_config.json`` for onnxruntime-genai (``qcompiler.deploy``).
    ``executor`` (``--ray``, :mod:`qcompiler.distributed`) runs calibration shards and per-layer
    work as tasks; the model files are the same bytes either way.
    """
    options = options or QuantizeOptions()
    t0 = time.perf_counter()
    src = open_model_dir(in_dir)
    out = Path(out_dir)
    inputs = (src.path, options.calib)
    check_output_dir(out, force, inputs)
    if dump_ir is not None:
        check_not_overlapping(dump_ir, (*inputs, out), what="--dump-ir folder")
    if recipe and get_recipe(recipe).needs_calibration and not options.calib:
        raise QCError(f"recipe '{recipe}' needs calibration data: pass --calib PATH")
    if options.needs_calibration and not options.calib:
        raise QCError(f"--kv-cache {options.kv_cache} calibrates the cache scales: pass --calib PATH")
    fp16 = is_fp16_model(src.model_path)
    if fp16 and recipe and not options.calib:
        log.warning("fp16 graph without --calib: activations past fp16's 65504 are not looked for; pass --calib "
                    "TEXT to keep the ops that overflow in float32 (docs/half.md)")
    text = build_pipeline_text(recipe, passes, options, fp16=fp16)
    context = make_context(src.path, options, executor=executor)
    pass_list = parse_pipeline(text, context)
    log.info("pipeline: %s", pipeline_text(pass_list))

    with atomic_output_dir(out, force, inputs) as tmp:
        model = load_model(src.model_path)
        if any(getattr(p.config, "nonfinite", "error") == "skip" for p in pass_list):
            log.warning("nonfinite=skip: linears with NaN/Inf weights stay float; the whole-model check is off")
        else:
            check_model_weights(model)  # any recipe: a NaN/Inf weight, bias or norm weight stops here
        _check_memory_bound(model, options.max_memory)
        family = coverage.model_type(src.path)
        _preflight(model, family, options.allow_partial)
        unknown = unknown_ops(model)
        if unknown:
            log.warning(
                "left alone: %d node(s) of op(s) qcompiler does not know: %s",
                sum(unknown.values()),
                ", ".join(f"{op} ×{n}" for op, n in unknown.items()),
            )
        # tensors the passes make go to scratch on the output's file system, not to memory
        spill = SpillStore(tmp / SPILL_DIR)
        attach_spill(model.graph, spill)
        try:
            model, records = run_passes(model, pass_list, dump_ir=dump_ir)
        except UnsupportedModelError as e:  # one line naming the family and what is missing
            if str(e).startswith(f"{family}: "):
                raise
            raise UnsupportedModelError(f"{family}: {e}") from None
        gemms = check_integer_gemms(model, options.cpu_isa)
        attach_spill(model.graph, None)
        cov = coverage.measure(model)
        coverage.enforce(cov, family, options.allow_partial)  # nothing is written on failure
        save_model(model, tmp / MODEL_FILE)
        del model
        spill.close()
        shutil.rmtree(tmp / SPILL_DIR)
        copy_side_files(src.path, tmp)
        if genai:
            from qcompiler.deploy import write_genai

            write_genai(tmp)
        summary: dict[str, Any] = {
            "qcompiler_version": __version__,
            "source": str(src.path),
            "recipe": recipe,
            "pipeline": pipeline_text(pass_list),
            "target": options.target,
            "options": applied_options(recipe, options, fp16=fp16),  # only what the pipeline read
            "scope": SCOPE_NOTE,
            "model_type": family,
            "coverage": cov.to_dict(),
            "kept_float": [k.to_dict() for k in cov.kept_float],
            "passes": [asdict(r) for r in records],
            "report": context.report,
            "unknown_ops": unknown,
            "integer_gemms": gemms,
            "wall_seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if (src.path / "quantization.json").is_file():  # e.g. a --keep-gguf-quant export: what it already carries
            summary["source_quantization"] = json.loads((src.path / "quantization.json").read_text())
        write_json(tmp / "quantization.json", summary)
    if cov.kept_float:
        log.info("kept in float: %s", ", ".join(f"{k.role or k.node} ({k.reason})" for k in cov.kept_float[:6]))
    log.info("wrote %s in %.1fs (peak RSS %.0f MiB)", out, summary["wall_seconds"], summary["peak_rss_mb"])
    return summary


def is_fp16_model(path: str | os.PathLike) -> bool:
    """Whether the saved graph (``model.onnx`` or its folder) is fp16 (False if it cannot be read:
    loading it reports why)."""
    try:
        return file_float_type(path) == ir.DataType.FLOAT16
    except Exception:  # a corrupt file is load_model's error to report, with its message
        return False


def _check_memory_bound(model: ir.Model, max_memory: str | None) -> None:
    """``--max-memory``: refuse, before any pass, a run whose estimated peak exceeds the bound."""
    if max_memory is None:
        return
    from qcompiler.calibrate.plan import format_bytes, parse_memory
    from qcompiler.memory import quantize_peak_bytes

    bound = parse_memory(max_memory)
    est = quantize_peak_bytes(model)
    detail = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in est.items() if k != "total")
    if est["total"] > bound:  # type: ignore[operator]
        raise QCError(f"--max-memory {max_memory}: quantizing this model needs about {format_bytes(est['total'])} "
                      f"({detail}); raise the bound (the largest tensor alone is resident while it is read)")
    log.info("memory: estimated peak %s within --max-memory %s (%s)", format_bytes(est["total"]), max_memory, detail)


def _preflight(model, family: str, allow_partial: bool) -> None:
    """Refuse early (before any costly pass) a graph whose decoder linears canonicalize cannot place."""
    if allow_partial:
        return
    get_pass("canonicalize")()(model)
    bad = [k.node for k in coverage.measure(model).unsupported if k.role is None]  # no role: no pattern matched
    if bad:
        raise coverage.UnsupportedModelError(coverage.unsupported_message(family, bad, "decoder linear(s) not recognized"))


def keep_fp32_in_place(folder: str | os.PathLike, calib: str, samples: int = 32, seq_len: int = 512) -> dict[str, Any]:
    """``qc export --dtype fp16 --calib TEXT``: run ``keep-fp32`` on an exported fp16 model folder and
    rewrite its model in place when it keeps ops in float32; the pass's report goes into
    ``qcompiler_export.json`` (``keep_fp32``) and is returned."""
    from qcompiler.calibrate import CalibConfig, Calibrator

    src = open_model_dir(folder)
    if not is_fp16_model(src.model_path):
        raise QCError(f"{src.path}: --calib keeps overflowing ops of an fp16 export in float32; this graph is not fp16")
    context = PassContext(calibrate=Calibrator(src.path, CalibConfig(calib=calib, samples=samples, seq_len=seq_len,
                                                                     progress=False)))
    model = load_model(src.model_path)
    result = get_pass(HALF_GUARD)(None, context)(model)
    report = context.report[HALF_GUARD]
    info_path = src.path / "qcompiler_export.json"
    info = {**(json.loads(info_path.read_text()) if info_path.is_file() else {}), "keep_fp32": report}
    if not result.modified:
        write_json(info_path, info)
        return report
    # the rewritten model (model.onnx and its data together) replaces the folder in one rename
    record_shapes(result.model)  # the export's shapes, for the Casts keep-fp32 added too
    with atomic_output_dir(src.path, force=True) as tmp:
        save_model(result.model, tmp / MODEL_FILE)
        del model, result
        written = {p.name for p in tmp.iterdir()}
        for f in src.path.iterdir():  # tokenizer, config and the rest of the export, as they are
            if f.is_file() and f.name not in written:
                shutil.copy2(f, tmp / f.name)
        write_json(tmp / info_path.name, info)
    return report
