"""Decoder families as data: how each lays out its linears, MLP, block and norms.

Canonicalize never reads these descriptions — it finds roles structurally with the rules
of :mod:`qcompiler.families.rules` — but they say what it must find for each family
(:meth:`Family.layer_roles`, checked by ``tests/test_families.py`` on tiny random models
of :mod:`qcompiler.families.tiny`).
Adding a family: one :data:`FAMILIES` row, one tiny config, and a rule only if its
layout is new.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler.spec import Role


@dataclass(frozen=True)
class Family:
    """One decoder family (``config.json``'s ``model_type``).

    ``qkv``: ``separate`` | ``fused`` (one linear cut by Split/Slice/Gather);
    ``mlp``: ``gated`` (act(gate)·up) | ``gated-fused`` (one gate_up linear) | ``plain`` (up → act → down);
    ``act``: the MLP activation as exported; ``block``: ``sequential`` | ``parallel``
    (attention and MLP read the same residual); ``norm``: ``rmsnorm`` | ``rmsnorm-1p``
    (``(1 + w)`` Gemma form) | ``layernorm``; ``qk_norm``: q/k normalized per head;
    ``linear``: ``MatMul`` | ``Gemm`` (rewritten to MatMul by canonicalize);
    ``extras``: attention/logit details (soft-cap, embedding scale, partial rotary ...);
    ``moe``: mixture-of-experts MLP — a router (kept float) and per-expert gate/up/down, numbered
    ``layers.L.experts.E.*`` in graph order (the exported graph computes every expert).
    """

    model_type: str
    qkv: str = "separate"
    mlp: str = "gated"
    act: str = "silu"
    block: str = "sequential"
    norm: str = "rmsnorm"
    qk_norm: bool = False
    linear: str = "MatMul"
    extras: tuple[str, ...] = ()
    moe: bool = False

    def layer_roles(self) -> tuple[Role, ...]:
        """The linear roles every decoder layer must have after canonicalize."""
        attn = (Role.QKV,) if self.qkv == "fused" else (Role.Q, Role.K, Role.V)
        mlp = {"gated": (Role.GATE, Role.UP), "gated-fused": (Role.GATE_UP,), "plain": (Role.UP,)}[self.mlp]
        if self.moe:  # the experts' linears are keyed layers.L.experts.E.*
            return (*attn, Role.O, Role.ROUTER)
        return (*attn, Role.O, *mlp, Role.DOWN)

    def expert_roles(self) -> tuple[Role, ...]:
        """The roles of each expert of a mixture-of-experts layer (empty for a dense family)."""
        return (Role.GATE, Role.UP, Role.DOWN) if self.moe else ()


_F = Family
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _F("llama"),
    _F("mistral", extras=("sliding window",)),
    _F("qwen2", extras=("q/k/v bias",)),
    _F("qwen3", qk_norm=True),
    _F("granite", extras=("embedding, residual, attention and logit multipliers",)),
    _F("olmo2", qk_norm=True, extras=("post-norms",)),
    _F("stablelm", norm="layernorm", extras=("partial rotary",)),
    _F("gemma", act="gelu-tanh", norm="rmsnorm-1p", extras=("embedding scale √d",)),
    _F("gemma2", act="gelu-tanh", norm="rmsnorm-1p", extras=("attention and logit soft-cap", "post-norms")),
    _F("gemma3_text", act="gelu-tanh", norm="rmsnorm-1p", qk_norm=True, extras=("sliding window", "post-norms")),
    _F("phi3", qkv="fused", mlp="gated-fused"),
    _F("cohere", block="parallel", norm="layernorm", extras=("logit scale",)),
    _F("opt", mlp="plain", act="relu", norm="layernorm", linear="Gemm", extras=("q/k/v bias",)),
    _F("gpt_neox", qkv="fused", mlp="plain", act="gelu", block="parallel", norm="layernorm",
       extras=("per-head interleaved qkv", "partial rotary")),
    _F("falcon", qkv="fused", mlp="plain", act="gelu", block="parallel", norm="layernorm",
       extras=("one norm shared by attention and MLP",)),
    _F("gpt2", qkv="fused", mlp="plain", act="gelu-tanh", norm="layernorm", linear="Gemm",
       extras=("Conv1D weights [in, out]", "learned positions")),
    _F("phi", mlp="plain", act="gelu-tanh", block="parallel", norm="layernorm", extras=("partial rotary",)),
    _F("qwen3_moe", qk_norm=True, moe=True),
)}

def family(model_type: str) -> Family | None:
    """The description of ``model_type``, or None for a family qcompiler has not described."""
    return FAMILIES.get(model_type)
