"""Which options a recipe (and its target's lowering) reads: any other option given is an error.

``qc quantize ... --recipe w4a16-rtn --bits 3`` used to write int4 and record ``"bits": 3``.
Now every option the user sets (on the command line or in ``--config``'s table) is either
read by the pipeline that runs or refused with its name and the recipe's, and
``quantization.json`` records only the options that were applied (:func:`applied_options`).
A recipe declares what it reads (:attr:`qcompiler.recipes.Recipe.options`, ``bits``); the
target's lowering reads :data:`TARGET_OPTIONS`; calibrating recipes read
:data:`qcompiler.recipes.CALIB_OPTIONS`.  A ``--passes`` pipeline states its own settings, so
only the target's and the calibration options apply to it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import asdict, fields
from typing import Any

from qcompiler.errors import OptionError
from qcompiler.recipes import (
    CALIB_OPTIONS,
    ROUND_OPTIONS,
    WEIGHT_ONLY_OPTIONS,
    QuantizeOptions,
    Recipe,
    get_recipe,
)

#: Options read by each target's lowering passes (``qcompiler.targets``), whatever the recipe.
#: ``cpu_isa`` is read by every target: the W8A8 lowerings (cpu, npu; fold-zero-point, whose GEMMs a
#: cuda session runs on its CPU provider) and the integer-GEMM invariant checked after every pipeline.
TARGET_OPTIONS: dict[str, frozenset[str]] = {
    "cpu": frozenset({"fuse", "cpu_isa", "kv_cache", "rotary_in_attention"}),
    "cuda": frozenset({"fuse", "cpu_isa", "kv_cache"}),
    "npu": frozenset({"static_shapes", "cpu_isa"}),
}
#: Options read only where a weight-only recipe meets a MatMulNBits target.
WEIGHT_ONLY_TARGET_OPTIONS: dict[str, frozenset[str]] = {"cpu": frozenset({"accuracy_level"}),
                                                          "cuda": frozenset({"accuracy_level"})}
#: Every option this table knows; an option added to QuantizeOptions later and not classified
#: here is let through (treated as read) until it is.
CLASSIFIED = (frozenset({"target", "bits"}) | CALIB_OPTIONS | WEIGHT_ONLY_OPTIONS
              | frozenset({"alpha", "budget", "max_size_mb", "sensitivity"}) | ROUND_OPTIONS
              | frozenset().union(*TARGET_OPTIONS.values()))
#: Options read by quantize-kv-cache (``--kv-cache int8|int4``, cpu/cuda lowering), which calibrates:
#: with a quantized cache the calibration options are read whatever the recipe (issue 17).
KV_CACHE_OPTIONS = frozenset({"kv_granularity", "kv_clip"})
CLASSIFIED = CLASSIFIED | KV_CACHE_OPTIONS
_FLAGS = {"max_size_mb": "--max-size", "fuse": "--no-fuse", "sym": "--sym/--asym"}


def flag(name: str) -> str:
    """The command-line spelling of option ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def used_options(recipe: str | None, target: str, kv_cache: str = "float", fp16: bool = False) -> frozenset[str] | None:
    """Options read by ``recipe`` (``None``: a ``--passes`` pipeline) on ``target``; ``None`` if the
    recipe declares nothing (every option passes).  A quantized ``kv_cache`` (on a target whose lowering
    reads it) adds the KV-cache options and the calibration options; so does an ``fp16`` graph (every
    recipe then runs ``keep-fp32`` on the calibration text)."""
    used = {"target", "max_memory"} | TARGET_OPTIONS.get(target, frozenset())  # every run checks its memory bound
    if kv_cache != "float" and "kv_cache" in used:
        used |= KV_CACHE_OPTIONS | CALIB_OPTIONS
    if fp16:
        used |= CALIB_OPTIONS
    if recipe is None:
        return frozenset(used | CALIB_OPTIONS | WEIGHT_ONLY_TARGET_OPTIONS.get(target, frozenset()))
    r = get_recipe(recipe)
    if r.options is None:
        return None
    used |= r.options - {"accuracy_level"}
    if "accuracy_level" in r.options:
        used |= WEIGHT_ONLY_TARGET_OPTIONS.get(target, frozenset())
    if r.needs_calibration:
        used |= CALIB_OPTIONS
    if r.bits is not None:
        used.add("bits")
    return frozenset(used)


def explicit_options(args: dict[str, Any], config_keys: Iterable[str] = ()) -> set[str]:
    """The QuantizeOptions fields the user set: non-``None`` command-line values and ``--config`` keys."""
    known = {f.name for f in fields(QuantizeOptions)}
    return {k for k, v in args.items() if k in known and v is not None} | (set(config_keys) & known)


def check_options(recipe: str | None, options: QuantizeOptions, explicit: Collection[str], fp16: bool = False) -> None:
    """Raise :class:`OptionError` for the first option in ``explicit`` that the run would not read
    (``fp16``: the input graph is fp16, see :func:`used_options`)."""
    used = used_options(recipe, options.target, options.kv_cache, fp16)
    if used is None:
        return
    where = f"recipe '{recipe}'" if recipe else "a --passes pipeline (its settings go in the pipeline text)"
    for name in sorted(explicit, key=lambda n: (n != "kv_cache", n)):  # --kv-cache first: it brings --calib
        if name not in CLASSIFIED:
            continue
        if name == "bits" and recipe is not None:
            _check_bits(get_recipe(recipe), options.bits)
            continue
        if name not in used:
            target_bound = name == "accuracy_level" or any(name in t for t in TARGET_OPTIONS.values())
            extra = f" on target '{options.target}'" if target_bound else ""
            reads = ", ".join(flag(n) for n in sorted(used - {"target"})) or "none"
            raise OptionError(f"{flag(name)} is not used by {where}{extra}; it reads: {reads}")


def _check_bits(r: Recipe, bits: int) -> None:
    if r.bits is None:
        raise OptionError(f"--bits is not used by recipe '{r.name}' (it chooses the bits of each linear)")
    if bits != r.bits:
        raise OptionError(
            f"--bits {bits} is not used by recipe '{r.name}', which writes {r.bits}-bit weights; "
            f"for other widths use --passes \"quantize-weights{{bits={bits},...}}\" (2, 3, 4 or 8 bits)"
        )


#: Options ONNX Runtime's quantizers (``qc bench``'s anchors) read.
ANCHOR_OPTIONS = frozenset({"bits", "group_size", "calib", "calib_samples", "seq_len"})


def check_bench_options(recipes: Iterable[str], options: QuantizeOptions, explicit: Collection[str],
                        anchors: bool = False) -> None:
    """``qc bench`` runs several recipes with one set of options: each option must be read by one of them."""
    names = [r for r in recipes if r]
    unions: set[str] = {"target"} | (ANCHOR_OPTIONS if anchors else set())
    for r in names:
        used = used_options(r, options.target, options.kv_cache)
        if used is None:
            return
        unions |= used
    for name in sorted(set(explicit) & CLASSIFIED - unions):
        raise OptionError(f"{flag(name)} is not used by any of the recipes benchmarked ({', '.join(names)})")


def applied_options(recipe: str | None, options: QuantizeOptions, fp16: bool = False) -> dict[str, Any]:
    """The options the run read, for ``quantization.json`` (``bits`` as the recipe writes them)."""
    used = used_options(recipe, options.target, options.kv_cache, fp16)
    values = {k: v for k, v in asdict(options).items() if v is not None}
    if used is None:
        return values
    out = {k: v for k, v in values.items() if k in used or k not in CLASSIFIED}
    if recipe is not None:
        r = get_recipe(recipe)
        if r.bits is not None:
            out["bits"] = r.bits
        else:
            out.pop("bits", None)
    else:
        out.pop("bits", None)
    return out
