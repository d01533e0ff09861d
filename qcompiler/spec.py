"""Frozen specs that analysis passes write and rewriting passes read.

``canonicalize`` writes a :class:`LinearInfo` on every linear layer's MatMul
(``node.meta[LINEAR_KEY]``); weight or activation analyses write :class:`QuantSpec`
annotations (``node.meta[WEIGHT_SPEC_KEY]`` / ``node.meta[ACT_SPEC_KEY]``); passes that
insert quantization only read them.  Mixed precision is a pass that rewrites the
annotations under a budget.  The annotations are mirrored into ``metadata_props`` so
that ``--dump-ir`` output shows them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_ir as ir

LINEAR_KEY = "qc.linear"
WEIGHT_SPEC_KEY = "qc.weight_spec"
ACT_SPEC_KEY = "qc.act_spec"


class Role(enum.StrEnum):
    """What a linear layer does inside a decoder layer."""

    Q = "q_proj"
    K = "k_proj"
    V = "v_proj"
    O = "o_proj"  # noqa: E741
    GATE = "gate_proj"
    UP = "up_proj"
    DOWN = "down_proj"
    QKV = "qkv_proj"  # fused q/k/v (one MatMul + Split)
    GATE_UP = "gate_up_proj"  # fused gate/up
    ROUTER = "router"  # mixture-of-experts gate: token → expert scores (kept float)
    LM_HEAD = "lm_head"


DECODER_ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)


@dataclass(frozen=True)
class LinearInfo:
    """Where a linear layer sits: decoder layer index (``-1`` for lm_head), role, and for a
    mixture-of-experts MLP the expert index."""

    layer: int
    role: Role
    expert: int | None = None

    @property
    def key(self) -> str:
        if self.role == Role.LM_HEAD:
            return "lm_head"
        where = f"layers.{self.layer}." + (f"experts.{self.expert}." if self.expert is not None else "")
        return where + self.role.value


class Granularity(enum.StrEnum):
    TENSOR = "tensor"
    CHANNEL = "channel"  # one scale per output channel (weights) / per input channel
    GROUP = "group"  # blocks of ``group_size`` along the reduction axis
    TOKEN = "token"  # one scale per row of the activation (dynamic)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits``/``symmetric`` give the integer grid: symmetric ``[-2^(b-1)+1, 2^(b-1)-1]``
    around zero (int), asymmetric ``[0, 2^b - 1]`` with a zero point (uint).  ``full_range``
    (symmetric only) uses all ``2^b`` codes: each group's largest-magnitude value is code
    ``-2^(b-1)`` exactly, through a signed scale (``qcompiler.quant.numerics``).
    ``group_size`` is used with ``Granularity.GROUP``; ``method`` names the algorithm
    that picks the scales (``rtn``, ``awq``, ``gptq``, ``hqq``, ``minmax``,
    ``percentile``, ``mse``, ``entropy``, ``dynamic``).
    """

    bits: int = 4
    symmetric: bool = False
    granularity: Granularity = Granularity.GROUP
    group_size: int = 128
    method: str = "rtn"
    clip: str = "minmax"  # for weights: minmax | mse
    # the float type the scales are stored in (fp32 | fp16 | bf16: the graph's): weight quantizers round
    # each scale to it before choosing the integer codes (qcompiler.quant.numerics.store_scales)
    scale_dtype: str = "fp32"
    full_range: bool = False  # symmetric: s = v/-2^(b-1), v the group's largest-magnitude value (signed)

    def __post_init__(self) -> None:
        if self.full_range and (not self.symmetric or self.bits == 7):
            raise ValueError("full_range needs a symmetric grid of 2, 3, 4 or 8 bits")
        if self.scale_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"scale_dtype must be fp32, fp16 or bf16, got {self.scale_dtype}")
        if self.bits not in (2, 3, 4, 7, 8):  # 7: int8-stored weights in [-63, 63] (qcompiler.quant.intgemm)
            raise ValueError(f"bits must be 2, 3, 4, 7 or 8, got {self.bits}")
        if self.granularity == Granularity.GROUP and (self.group_size < 2 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group size must be a power of two >= 2, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.granularity == Granularity.GROUP else str(self.granularity)
        grid = ("sym-full" if self.full_range else "sym") if self.symmetric else "asym"
        return f"{self.method} int{self.bits} {grid} {g}"

    def to_dict(self) -> dict[str, object]:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.value,
            "group_size": self.group_size if self.granularity == Granularity.GROUP else None,
            "method": self.method,
            "clip": self.clip,
            **({"full_range": True} if self.full_range else {}),
        }


def linear_info(node: ir.Node) -> LinearInfo | None:
    return node.meta.get(LINEAR_KEY)


def set_linear_info(node: ir.Node, info: LinearInfo) -> None:
    node.meta[LINEAR_KEY] = info
    node.metadata_props["qc.layer"] = str(info.layer)
    node.metadata_props["qc.role"] = info.role.value
    if info.expert is not None:
        node.metadata_props["qc.expert"] = str(info.expert)


def weight_spec(node: ir.Node) -> QuantSpec | None:
    return node.meta.get(WEIGHT_SPEC_KEY)


def set_weight_spec(node: ir.Node, spec: QuantSpec | None) -> None:
    if spec is None:
        node.meta.pop(WEIGHT_SPEC_KEY, None)
        node.metadata_props.pop("qc.weight_spec", None)
        return
    node.meta[WEIGHT_SPEC_KEY] = spec
    node.metadata_props["qc.weight_spec"] = spec.describe()


def act_spec(node: ir.Node) -> QuantSpec | None:
    """The activation (input 0) spec of a linear, written by analysis passes for ``insert-qdq``."""
    return node.meta.get(ACT_SPEC_KEY)


def set_act_spec(node: ir.Node, spec: QuantSpec | None) -> None:
    if spec is None:
        node.meta.pop(ACT_SPEC_KEY, None)
        node.metadata_props.pop("qc.act_spec", None)
        return
    node.meta[ACT_SPEC_KEY] = spec
    node.metadata_props["qc.act_spec"] = spec.describe()
