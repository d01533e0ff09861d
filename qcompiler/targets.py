"""Deployment targets and the lowering passes each appends to a recipe's pipeline.

* ``cpu``: ONNX Runtime CPU — ``MatMulNBits`` for weight-only int4/int8;
* ``cuda``: ONNX Runtime CUDA — ``MatMulNBits`` plus qcompiler's own ops where ORT has none;
* ``npu``: plain QDQ at opset 21, standard-domain ops only (the portable form as is).

Every target's lowering steps are registered at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable

from qcompiler.errors import QCError
from qcompiler.recipes import QuantizeOptions

TARGETS = ("cpu", "cuda", "npu")

_LOWERING: dict[str, list[tuple[int, Callable[[QuantizeOptions], str]]]] = {t: [] for t in TARGETS}


def register_lowering(target: str, order: int, build: Callable[[QuantizeOptions], str]) -> None:
    """Add a lowering step (pipeline text) to ``target``; steps run by increasing ``order``."""
    _LOWERING[target].append((order, build))
    _LOWERING[target].sort(key=lambda x: x[0])


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise QCError(f"unknown target '{target}'; choices: {', '.join(TARGETS)}")
    return target


def lowering_pipeline(target: str, options: QuantizeOptions) -> str:
    check_target(target)
    return ",".join(filter(None, (build(options) for _, build in _LOWERING[target])))


register_lowering("cpu", 50, lambda o: f"lower-matmulnbits{{accuracy_level={o.accuracy_level}}}")
register_lowering("cuda", 50, lambda o: f"lower-matmulnbits{{accuracy_level={o.accuracy_level}}}")

# issue 6 (targets and custom EP ops): W8A8 lowering runs before lower-matmulnbits, which
# would otherwise take the int8 weight DequantizeLinear of a W8A8 MatMul for weight-only.
register_lowering("cpu", 40, lambda o: f"lower-w8a8-cpu{{cpu_isa={o.cpu_isa}}}")
register_lowering("cuda", 40, lambda o: "lower-qc-ops")
register_lowering("npu", 50, lambda o: f"lower-npu{{cpu_isa={o.cpu_isa}"
                  + (f",static_shapes={o.static_shapes}}}" if o.static_shapes else "}"))

# issue 11 (fusion): the decoder fusions run on the portable forms, before the target's
# lowering (W8A8 at 40, MatMulNBits at 50), which then turns each packed q/k/v and gate/up
# linear into one kernel; folding bias Adds needs the lowered kernels, so it runs after.
# Each fusion also works (and is exact) on already-lowered graphs — MatMulNBits,
# GatherBlockQuantized, MatMulIntegerToFloat (tests/passes/test_fuse_after_lowering.py) —, so a
# recipe that lowers in its own text (w4a16-genai) gets them from here as well.
# fuse-rules applies the rewrite-rule fusions (rmsnorm, skip-rmsnorm, silu) in one sweep.
# Its silu group writes com.microsoft.QuickGelu, which ONNX Runtime's CUDA provider has no kernel
# for (OperatorKernels.md; `qc check --target cuda` flagged 30 CPU fallbacks): Sigmoid·Mul
# stays as it is on cuda, where both ops have kernels.
FUSION_PASSES = "fuse-rules,fuse-rotary,fuse-attention,fuse-pack-linears"
CUDA_FUSION_PASSES = FUSION_PASSES.replace("fuse-rules", "fuse-rules{rules=rmsnorm:skip-rmsnorm}")
register_lowering("cpu", 30, lambda o: FUSION_PASSES if o.fuse else "")
register_lowering("cuda", 30, lambda o: CUDA_FUSION_PASSES if o.fuse else "")
for _target in ("cpu", "cuda"):
    register_lowering(_target, 60, lambda o: "fuse-bias" if o.fuse else "")
# --rotary-in-attention (cpu): GroupQueryAttention reads the packed q|k|v and rotates it itself, last (it matches
# the lowered, fused graph); opt-in, for the right-padded batches it does not keep exact (passes/fuse_gqa_rotary.py)
register_lowering("cpu", 70, lambda o: "fuse-gqa-rotary" if o.fuse and o.rotary_in_attention else "")

# issue 9 (weight-only, --quantize-embeddings): row-blocked embedding DequantizeLinear →
# GatherBlockQuantized + MatMulNBits sharing one packed tensor.
register_lowering("cpu", 45, lambda o: f"lower-embeddings{{accuracy_level={o.accuracy_level}}}")
register_lowering("cuda", 45, lambda o: f"lower-embeddings{{accuracy_level={o.accuracy_level}}}")

# issue 17 (KV cache): after the fusion (GroupQueryAttention) and the weights' lowering, so the
# cache scales are calibrated on the model as it will run.
def _kv_cache_step(o: QuantizeOptions) -> str:
    from qcompiler.recipes import KV_CACHE_BITS

    if o.kv_cache == "float":
        return ""
    g = o.kv_granularity  # keys and values alike: ORT's CPU kernel requires k_quant_type == v_quant_type
    return (f"quantize-kv-cache{{bits={KV_CACHE_BITS[o.kv_cache]},k_granularity={g},"
            f"v_granularity={g},clip={o.kv_clip}}}")


for _target in ("cpu", "cuda"):
    register_lowering(_target, 55, _kv_cache_step)
