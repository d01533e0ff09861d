"""Named recipes: a pipeline template plus what it needs.

A recipe expands, with the user's :class:`QuantizeOptions`, to a textual pipeline of
passes; target lowering (``qcompiler.targets``) is appended by ``qc quantize``.  All recipes
are registered at the bottom of this file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from qcompiler.errors import InputError, OptionError, QCError
from qcompiler.quant.intgemm import check_cpu_isa, int8_weight_bits


@dataclass(frozen=True)
class QuantizeOptions:
    """Typed options of ``qc quantize`` (also loadable from a TOML file's ``[quantize]`` table)."""

    bits: int = 4
    group_size: int = 128  # 0 = per-channel
    sym: bool = False
    clip: str = "minmax"
    target: str = "cpu"
    accuracy_level: int = 0
    lm_head: bool = False
    quantize_embeddings: bool = False
    # calibration (recipes that need data)
    calib: str | None = None
    calib_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    max_memory: str | None = None
    # recipe-specific knobs
    alpha: float | None = None
    budget: float | None = None
    max_size_mb: float | None = None
    sensitivity: str | None = None  # mixed: assign-precision's ranking (kl | output-error | blend | logit-skip)
    static_shapes: int | None = None
    # learned rounding (issue 22, recipes w4a16-round, w4a16-rotate-round): passes/round.py's defaults when None
    round_iters: int | None = None
    round_lr: float | None = None
    round_samples: int | None = None
    fuse: bool = True  # cpu/cuda: fuse norms, rotary, attention, packed linears (issue 11)
    rotate: bool = False  # --rotate: the rotate pass (residual stream) after the recipe's canonicalize (issue 22)
    allow_partial: bool = False  # write a model whose unsupported decoder linears stay float (issue 23)
    # CPUs the model must be exact on: "any" (u8×u8 integer GEMMs) or "vnni" (u8×s8, VNNI/AMX/ARM only);
    # see qcompiler/quant/intgemm.py
    cpu_isa: str = "any"
    # KV cache (issue 17): float | int8 | int4, stored by ONNX Runtime's GroupQueryAttention with scales
    # calibrated on --calib (passes/quantize_kv_cache.py); granularity of the key scales and clipping
    kv_cache: str = "float"
    kv_granularity: str = "channel"  # channel | tensor (keys; values per channel unless tensor)
    kv_clip: str = "minmax"  # minmax | mse
    # cpu (issue 24): GroupQueryAttention applies the rotary itself from the packed q|k|v (fuse-gqa-rotary,
    # onnxruntime-genai's form): faster decode, exact for unpadded and left-padded batches, not for right-padded
    # ones decoding after their padding (passes/fuse_gqa_rotary.py)
    rotary_in_attention: bool = False

    def __post_init__(self) -> None:
        try:
            check_cpu_isa(self.cpu_isa)
        except ValueError as e:
            raise OptionError(f"--cpu-isa: {e}") from None
        if self.kv_cache not in KV_CACHE_BITS:
            raise OptionError(f"--kv-cache: '{self.kv_cache}' is not one of {', '.join(KV_CACHE_BITS)}")
        if self.kv_granularity not in ("channel", "tensor"):
            raise OptionError(f"--kv-granularity: '{self.kv_granularity}' is not one of channel, tensor")
        if self.kv_clip not in ("minmax", "mse"):
            raise OptionError(f"--kv-clip: '{self.kv_clip}' is not one of minmax, mse")
        if self.rotary_in_attention and not self.fuse:
            raise OptionError("--rotary-in-attention folds the fused attention's rotary: it needs the fusions "
                              "(drop --no-fuse)")

    @property
    def needs_calibration(self) -> bool:
        """Whether the run calibrates whatever the recipe: a quantized KV cache does."""
        return self.kv_cache != "float"

    def with_overrides(self, **kw: Any) -> QuantizeOptions:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in kw.items() if k in known and v is not None})


#: ``--kv-cache`` choices → cache bits (0: float, as exported)
KV_CACHE_BITS = {"float": 0, "int8": 8, "int4": 4}


def load_options_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"no such config file: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p}: invalid TOML: {e}") from None
    table = data.get("quantize", data)
    known = {f.name for f in fields(QuantizeOptions)}
    unknown = sorted(set(table) - known - {"recipe", "passes"})
    if unknown:
        raise OptionError(f"{p}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(table)


#: Options read by calibration (recipes that need data).
CALIB_OPTIONS = frozenset({"calib", "calib_samples", "seq_len", "seed", "max_memory"})
#: Options of weight-only recipes (``accuracy_level`` is the MatMulNBits lowering's, cpu/cuda).
WEIGHT_ONLY_OPTIONS = frozenset({"group_size", "sym", "clip", "lm_head", "quantize_embeddings", "accuracy_level"})
W8A8_OPTIONS = frozenset({"clip", "lm_head"})
#: Options of the learned-rounding recipes (``round`` pass: iters, lr, samples).
ROUND_OPTIONS = frozenset({"round_iters", "round_lr", "round_samples"})
#: What the learned-rounding recipes read: the weight-only options but clip (round learns its own clipping)
#: and lm_head (their pipelines do not read it), and ROUND_OPTIONS.
ROUND_RECIPE_OPTIONS = (WEIGHT_ONLY_OPTIONS - {"clip", "lm_head"}) | ROUND_OPTIONS


@dataclass(frozen=True)
class Recipe:
    """A named pipeline.  ``options`` are the :class:`QuantizeOptions` fields its pipeline reads
    (besides ``target``, the target's own and, with ``needs_calibration``, :data:`CALIB_OPTIONS`);
    any other option given is an error (``qcompiler.option_use``).  ``bits`` is the weight width it
    writes (``--bits`` may only repeat it); ``None`` for recipes that choose per linear."""

    name: str
    description: str
    build: Callable[[QuantizeOptions], str]
    needs_calibration: bool = False
    options: frozenset[str] | None = None  # None: not declared (every option passes)
    bits: int | None = None


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    _RECIPES[recipe.name] = recipe
    return recipe


def available_recipes() -> dict[str, Recipe]:
    return dict(sorted(_RECIPES.items()))


def get_recipe(name: str) -> Recipe:
    recipes = available_recipes()
    if name not in recipes:
        raise QCError(f"unknown recipe '{name}'; choices: {', '.join(recipes)}")
    return recipes[name]


def _embeddings_step(o: QuantizeOptions, bits: int, method: str = "rtn") -> str:
    """``,quantize-embeddings{...}`` when ``--quantize-embeddings`` is given, else ``""``."""
    if not o.quantize_embeddings:
        return ""
    return (f",quantize-embeddings{{bits={bits},group_size={o.group_size},sym={o.sym},"
            f"method={method},clip={o.clip}}}")


def _weight_only(method: str, bits: int | None = None) -> Callable[[QuantizeOptions], str]:
    def build(o: QuantizeOptions) -> str:
        b = bits if bits is not None else o.bits
        return (
            f"canonicalize,quantize-weights{{bits={b},group_size={o.group_size},sym={o.sym},"
            f"method={method},clip={o.clip},lm_head={o.lm_head}}}"
        ) + _embeddings_step(o, b, method)

    return build


register_recipe(
    Recipe(
        "w4a16-rtn",
        "int4 weights (round to nearest, exact per-group min/max), float activations",
        _weight_only("rtn", 4),
        options=WEIGHT_ONLY_OPTIONS,
        bits=4,
    )
)


def _genai(o: QuantizeOptions) -> str:
    """onnxruntime-genai's int4 CPU build (``builder -p int4 -e cpu``): RTN g32 on ONNX Runtime's symmetric
    grid (all 16 codes, each block's largest-magnitude value at -8 through a signed scale: ``full_range``),
    the tied embedding / lm_head table int4 the same way, MatMulNBits ``accuracy_level=4`` (int8
    activations)."""
    grid = "bits=4,group_size=32,sym=True,full_range=True,method=rtn,clip=minmax"
    text = f"canonicalize,quantize-weights{{{grid}}},quantize-embeddings{{{grid}}}"
    if o.target in ("cpu", "cuda"):  # lowered here at level 4; the target's lowering then finds nothing left
        # (its fusions, which follow, match the lowered MatMulNBits forms as well)
        text += ",lower-matmulnbits{accuracy_level=4},lower-embeddings{accuracy_level=4}"
    return text


# issue 24: genai's settings as a named recipe (faster decode than w4a16-rtn's defaults,
# higher perplexity: docs/fusion.md)
register_recipe(
    Recipe("w4a16-genai", "onnxruntime-genai's int4 settings: RTN g32 full-range sym, int4 tied embedding/lm_head, "
           "accuracy_level=4 (int8 activations): fastest decode, +7% perplexity on SmolLM2", _genai,
           options=frozenset(), bits=4)
)
def _fast(body: str) -> Callable[[QuantizeOptions], str]:
    """The accurate-and-fast int4 for ONNX Runtime CPU (issue 24, docs/fusion.md): the decoder int4 at
    ``--group-size`` (default 128) by ``body`` — ``awq-gptq`` (AWQ scales and clipping, then GPTQ rounding on
    ``--calib``) or ``rtn`` —, the tied embedding / lm_head table int4 g32 with the lm_head's codes chosen by
    GPTQ on the final norm's output (``--calib``), the lookup keeping RTN codes; on cpu, MatMulNBits at
    accuracy level 4 (int8 activations in the kernel).  Both bodies give the same graph (the same kernels,
    block sizes and node count): the decode speed is the same, the perplexity is not."""

    def build(o: QuantizeOptions) -> str:
        if body == "awq-gptq":
            decoder = f"awq{{bits=4,group_size={o.group_size},sym={o.sym},gptq=true}}"
        else:
            decoder = f"quantize-weights{{bits=4,group_size={o.group_size},sym={o.sym},method=rtn,clip={o.clip}}}"
        text = (f"canonicalize,{decoder},"
                f"quantize-embeddings{{bits=4,group_size=32,sym={o.sym},method=gptq,share=False}}")
        if o.target == "cpu":  # lowered here at level 4 (like w4a16-genai); the target's fusions follow
            text += ",lower-matmulnbits{accuracy_level=4},lower-embeddings{accuracy_level=4}"
        return text

    return build


# SmolLM2-135M, calibrated on the GPL-3 (docs/fusion.md): perplexity on git's release notes / Python source /
# Vim docs 47.42 / 13.48 / 27.96 with the AWQ+GPTQ body, 56.14 / 15.05 / 29.18 with RTN's, onnxruntime-genai's
# int4 58.20 / 13.52 / 30.46; compile 205 s against 10 s (AWQ's search and GPTQ run layer by layer)
register_recipe(
    Recipe("w4a16-fast", "int4 for fast CPU decode: AWQ+GPTQ int4 decoder, int4 lm_head whose codes GPTQ picks "
           "(the embedding lookup RTN int4), accuracy_level=4 on cpu; all on --calib", _fast("awq-gptq"),
           needs_calibration=True, options=frozenset({"group_size", "sym"}), bits=4)
)
register_recipe(
    Recipe("w4a16-fast-rtn", "w4a16-fast's graph and speed with an RTN int4 decoder: seconds to build, any family "
           "(no layer-wise pass), higher perplexity; the lm_head's codes still by GPTQ on --calib", _fast("rtn"),
           needs_calibration=True, options=frozenset({"group_size", "sym", "clip"}), bits=4)
)
register_recipe(
    Recipe("w8a16-rtn", "int8 weights (round to nearest), float activations", _weight_only("rtn", 8),
           options=WEIGHT_ONLY_OPTIONS, bits=8)
)


# ----------------------------------------------------------------------------- W8A8 (issue 10)
# Decoder linears only: lm_head (unless --lm-head), attention-score MatMuls and the KV cache stay
# float; the passes say so in quantization.json's report.


#: static-aware α search: the largest α tried.  The search scores α on the calibration rows,
#: whose static range is exact for them; there it picks α ≈ 1 (all difficulty moved into the
#: weights), which generalizes badly.  Capping α at 0.5 measured on SmolLM2 (static-smooth,
#: calibration GPL-3, evaluation git release notes 2.4 / 2.3): Δppl +10.2% → +5.4% and
#: +7.2% → +3.7%, KL 0.116 → 0.059 and 0.096 → 0.046 (the best KL of caps 0.3–0.6 on both texts).
STATIC_ALPHA_MAX = 0.5


def _w8a8_smooth(act: str, o: QuantizeOptions) -> str:
    if o.alpha is not None:  # a fixed migration strength instead of the per-group search
        return f"smooth-scale{{act={act},search=false,alpha={o.alpha}}}"
    if act == "static":
        return f"smooth-scale{{act={act},alpha_max={STATIC_ALPHA_MAX}}}"
    return f"smooth-scale{{act={act}}}"


#: static recipes out of domain (issue 22, docs/w8a8.md "Out of domain"): the inputs of largest static
#: error on the calibration rows keep higher-precision activations, at most this fraction of the
#: linears.  On SmolLM2 the float ablation (tools/ood_ablate.py) puts the loss in the down_proj inputs
#: (massive activations set their one range); the criterion picks 21 inputs, down_proj (and o_proj
#: after rotation): w8a8-static-rotate +12.7% → +0.3% on Python source, calibrated on the GPL-3.
STATIC_FALLBACK_BUDGET = 0.1


def _static_fallback(o: QuantizeOptions) -> str:
    """insert-qdq options of the static recipes' fallback: float on CPU, int16 (A16W8) QDQ for NPUs."""
    return f",fallback_budget={STATIC_FALLBACK_BUDGET},fallback_dtype={'int16' if o.target == 'npu' else 'float'}"


def _w8a8_qdq(o: QuantizeOptions, act: str, extra: str = "") -> str:
    # ONNX Runtime fuses the npu target's static QDQ MatMuls itself, into u8×s8 GEMMs that
    # saturate on x86 CPUs without VNNI unless |q| <= 63 (qcompiler/quant/intgemm.py)
    bits = int8_weight_bits(o.cpu_isa, qdq=(act == "static" and o.target == "npu"))
    wb = f",weight_bits={bits}" if bits != 8 else ""
    return f"insert-qdq{{act={act},weight_clip={o.clip},lm_head={o.lm_head}{wb}{extra}}}"


register_recipe(Recipe(
    "w8a8-static",
    "W8A8 baseline: int8 per-channel weights, static per-tensor int8 activations from calibration min/max",
    lambda o: f"canonicalize,{_w8a8_qdq(o, 'static', ',method=minmax')}",
    needs_calibration=True, options=W8A8_OPTIONS, bits=8,
))
register_recipe(Recipe(
    "w8a8-dynamic",
    "W8A8: int8 per-channel weights, dynamic per-token int8 activations (no calibration)",
    lambda o: f"canonicalize,{_w8a8_qdq(o, 'per-token')}",
    options=W8A8_OPTIONS, bits=8,
))
register_recipe(Recipe(
    "w8a8-smooth",
    "W8A8 SmoothQuant: per-layer α search, scales folded into norms / v / up, per-token int8 activations",
    lambda o: f"canonicalize,{_w8a8_smooth('per-token', o)},{_w8a8_qdq(o, 'per-token')}",
    needs_calibration=True, options=W8A8_OPTIONS | {"alpha"}, bits=8,
))
#: static smoothing out of domain (issue 22, docs/w8a8.md "Out of domain"): the MLP's inputs get online
#: orthogonal transforms inside each block (``rotate{residual=false}``: valid for any norm, LayerNorm included,
#: unlike the residual rotation), smoothing and splitting keep the attention inputs.  On SmolLM2 calibrated on
#: the GPL-3 the float ablation (tools/ood_ablate.py) put what smoothing left on Python source in the gate/up
#: inputs (a residual channel that moves between domains: no α and no 10% fallback covers 30 layers) and in
#: down_proj (sink tokens); the transforms spread both.
STATIC_SMOOTH_BLOCK_TRANSFORMS = "rotate{residual=false,online_in=gate_up,online_down=true,v_o=true}"


def _w8a8_static_smooth(o: QuantizeOptions) -> str:
    groups = "groups=qkv:o_proj"
    smooth = _w8a8_smooth("static", o).replace("smooth-scale{", f"smooth-scale{{{groups},")
    return (f"canonicalize,{STATIC_SMOOTH_BLOCK_TRANSFORMS},{smooth},split-outliers{{budget=0.05,{groups}}},"
            f"{_w8a8_qdq(o, 'static', ',method=minmax,dtype=uint8,sym=false' + _static_fallback(o))}"
            + ("" if o.target == "npu" else f",fold-zero-point{{cpu_isa={o.cpu_isa}}}"))


register_recipe(Recipe(
    "w8a8-static-smooth",
    "W8A8 for NPUs: online orthogonal transforms on the MLP's inputs (gate/up and down_proj, inside each block: "
    "any norm) and a per-head one on o_proj's, SmoothQuant (static-aware α search) + outlier channel splitting "
    "on the attention inputs, static per-tensor uint8 activations (calibrated min/max) with the zero point folded "
    "into the integer GEMM's bias; the 10% of linears with the largest static error keep float (cpu) or int16 "
    "(npu) activations",
    _w8a8_static_smooth,
    needs_calibration=True, options=W8A8_OPTIONS | {"alpha"}, bits=8,
))
register_recipe(Recipe(
    "w8a8-int8mix",
    "LLM.int8: outlier input channels (|x| ≥ 6) through a float side MatMul, the rest per-token int8",
    lambda o: "canonicalize,mixed-decompose",
    needs_calibration=True, options=frozenset(), bits=8,
))


# issue 5 (analysis): mixed precision under a budget.  assign-precision measures each linear's
# predicted error per option with the calibration data (or reads a qc analyze report) and
# annotates the exact budgeted choice; quantize-weights applies the annotations.
def _mixed(o: QuantizeOptions) -> str:
    if o.budget is None and o.max_size_mb is None:
        raise QCError("recipe 'mixed' needs a budget: --budget AVG_BITS (e.g. 4.5) or --max-size MB")
    limits = ",".join(f"{k}={v}" for k, v in (("budget", o.budget), ("max_size_mb", o.max_size_mb)) if v is not None)
    common = f"sym={o.sym},clip={o.clip},lm_head={o.lm_head}"
    if o.sensitivity is not None:
        limits += f",sensitivity={o.sensitivity}"
    return (
        f"canonicalize,assign-precision{{{limits},{common},seq_len={o.seq_len}}},"
        f"quantize-weights{{bits=4,group_size={o.group_size},method=rtn,{common}}}"
    ) + _embeddings_step(o, 4)


register_recipe(
    Recipe(
        "mixed",
        "per-linear weight precision (int4 g128/g64/g32, int8) chosen exactly under --budget AVG_BITS or "
        "--max-size MB from measured sensitivities (round to nearest)",
        _mixed,
        needs_calibration=True,
        options=WEIGHT_ONLY_OPTIONS | {"budget", "max_size_mb", "sensitivity"},
    )
)


# issue 9 (weight-only int4/int8 beyond RTN): data-aware AWQ and GPTQ, data-free HQQ.
def _calibrated(pass_text: Callable[[QuantizeOptions], str]) -> Callable[[QuantizeOptions], str]:
    def build(o: QuantizeOptions) -> str:
        return f"canonicalize,{pass_text(o)}" + _embeddings_step(o, 4)

    return build


register_recipe(
    Recipe(
        "w4a16-awq",
        "int4 weights, activation-aware scales (searched on --calib data, folded into norms/v/up) + clipping",
        _calibrated(lambda o: f"awq{{bits=4,group_size={o.group_size},sym={o.sym}}}"),
        needs_calibration=True,
        options=WEIGHT_ONLY_OPTIONS - {"clip", "lm_head"},  # AWQ searches its own clipping
        bits=4,
    )
)
register_recipe(
    Recipe(
        "w4a16-gptq",
        "int4 weights, GPTQ (sequential layer by layer on --calib data, act-order, static groups)",
        _calibrated(lambda o: f"gptq{{bits=4,group_size={o.group_size},sym={o.sym},clip={o.clip}}}"),
        needs_calibration=True,
        options=WEIGHT_ONLY_OPTIONS - {"lm_head"},
        bits=4,
    )
)
register_recipe(
    Recipe(
        "w4a16-awq-gptq",
        "int4 weights, AWQ scales and clipping, then GPTQ rounding with the same Hessians (--calib data)",
        _calibrated(lambda o: f"awq{{bits=4,group_size={o.group_size},sym={o.sym},gptq=true}}"),
        needs_calibration=True,
        options=WEIGHT_ONLY_OPTIONS - {"clip", "lm_head"},
        bits=4,
    )
)
register_recipe(
    Recipe(
        "w4a16-hqq",
        "int4 weights, half-quadratic refinement of scales/zero points (no calibration data)",
        _weight_only("hqq", 4),
        options=WEIGHT_ONLY_OPTIONS - {"clip"},  # HQQ keeps the exact range
        bits=4,
    )
)


# issue 22: accuracy per bit.  ``rotate`` (passes/rotate.py) folds the norm weights and rotates the
# residual stream by a randomized Hadamard, exactly in float: outlier channels are spread over all
# channels before the weights (GPTQ) or the activations (static int8) are quantized.
register_recipe(
    Recipe(
        "w4a16-rotate",
        "int4 weights: residual stream rotated by a randomized Hadamard (norms folded), then GPTQ (--calib data)",
        _calibrated(lambda o: f"rotate,gptq{{bits=4,group_size={o.group_size},sym={o.sym},clip={o.clip}}}"),
        needs_calibration=True,
        options=WEIGHT_ONLY_OPTIONS - {"lm_head"},
        bits=4,
    )
)
register_recipe(Recipe(
    "w8a8-static-rotate",
    "W8A8 static: residual stream rotated (norms folded), a per-head transform on o_proj's input and an online "
    "Hadamard on down_proj's input, then "
    "static per-tensor uint8 activations (calibrated min/max) with the zero point folded into a bias; the 10% "
    "of linears with the largest static error keep float (cpu) or int16 (npu) activations",
    lambda o: ("canonicalize,rotate{online_down=true,v_o=true},"
               f"{_w8a8_qdq(o, 'static', ',method=minmax,dtype=uint8,sym=false' + _static_fallback(o))}"
               + ("" if o.target == "npu" else f",fold-zero-point{{cpu_isa={o.cpu_isa}}}")),
    needs_calibration=True, options=W8A8_OPTIONS, bits=8,
))


# issue 22: rotation, then AWQ scales and GPTQ rounding: the int4 recipe of the out-of-domain table
# (docs/weight_only.md "Int4 out of domain"): SmolLM2 relnotes +10.3% / code +16.8% (1024 tokens), against
# +14.9% / +24.5% for rotation + GPTQ.
register_recipe(
    Recipe(
        "w4a16-rotate-awq-gptq",
        "int4 weights: residual stream rotated by a randomized Hadamard (norms folded), then AWQ scales and "
        "clipping and GPTQ rounding (--calib data)",
        _calibrated(lambda o: f"rotate,awq{{bits=4,group_size={o.group_size},sym={o.sym},gptq=true}}"),
        needs_calibration=True,
        options=WEIGHT_ONLY_OPTIONS - {"clip", "lm_head"},
        bits=4,
    )
)


# issue 22: learned rounding (passes/round.py): per decoder layer, rounding offsets and group ranges learned by
# signed gradient descent against the whole layer's output, from RTN; after rotation in w4a16-rotate-round.
def _round(o: QuantizeOptions, init: str = "rtn") -> str:
    knobs = "".join(f",{k}={v}" for k, v in (("iters", o.round_iters), ("lr", o.round_lr),
                                              ("samples", o.round_samples)) if v is not None)
    # around GPTQ: the offsets alone, small steps (passes/round.py)
    start = "" if init == "rtn" else f",init={init},learn_range=False" + ("" if o.round_lr is not None else ",lr=0.005")
    return f"round{{bits=4,group_size={o.group_size},sym={o.sym}{start}{knobs}}}"


register_recipe(
    Recipe(
        "w4a16-round",
        "int4 weights, learned rounding (AutoRound-style: rounding offsets and group ranges learned per decoder "
        "layer against the layer's float output, signed gradient descent on --calib data), from RTN",
        _calibrated(_round),
        needs_calibration=True,
        options=ROUND_RECIPE_OPTIONS,
        bits=4,
    )
)
register_recipe(
    Recipe(
        "w4a16-rotate-round",
        "int4 weights: residual stream rotated by a randomized Hadamard (norms folded), then learned rounding "
        "(--calib data)",
        _calibrated(lambda o: f"rotate,{_round(o)}"),
        needs_calibration=True,
        options=ROUND_RECIPE_OPTIONS,
        bits=4,
    )
)
# ... and from GPTQ's solution (round{init=gptq}: GPTQ on each layer, then the offsets learned around its codes).
register_recipe(
    Recipe(
        "w4a16-gptq-round",
        "int4 weights: GPTQ per decoder layer, then learned rounding around GPTQ's codes (--calib data)",
        _calibrated(lambda o: _round(o, "gptq")),
        needs_calibration=True,
        options=ROUND_RECIPE_OPTIONS,
        bits=4,
    )
)
register_recipe(
    Recipe(
        "w4a16-rotate-gptq-round",
        "int4 weights: residual stream rotated by a randomized Hadamard (norms folded), then GPTQ and learned "
        "rounding around its codes per decoder layer (--calib data)",
        _calibrated(lambda o: f"rotate,{_round(o, 'gptq')}"),
        needs_calibration=True,
        options=ROUND_RECIPE_OPTIONS,
        bits=4,
    )
)
