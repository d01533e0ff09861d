"""fuse-rules: the rewrite-rule fusions in one sweep over the graph.

    fuse-rules  ≡  fuse-rmsnorm, fuse-skip-rmsnorm, fuse-silu   (same graph, one walk)

Each fusion is exact on its own (the math is in its module: ``fuse_rmsnorm``,
``fuse_skip_rmsnorm``, ``fuse_silu``), so applying them in one walk computes the same
function; it also writes the same graph, because a rule's match reads only its own region
and :func:`._fusion.sweep` keeps their order at every node: a norm first becomes
``SimplifiedLayerNormalization`` and that new node is offered to the skip-norm rules at once
(where the passes fused every norm first, then walked the graph again for the skip-norms).
The rules touch disjoint regions (norm statistics / residual Add / MLP activation), so fusing
SiLU before rotary, attention and packing, not after them, changes nothing either
(``tests/passes/test_fuse_rules.py`` compares graphs and logits).  ``rules`` picks a subset
(``fuse-rules{rules=rmsnorm:skip-rmsnorm}`` on cuda, which has no QuickGelu kernel); each
group keeps its own pass name and report key (``fuse-rmsnorm`` ≡ ``fuse-rules{rules=rmsnorm}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qcompiler.pipeline import register_pass

from ._fusion import RuleGroup, RuleSweep
from .fuse_rmsnorm import GROUP as RMSNORM
from .fuse_silu import GROUP as SILU
from .fuse_skip_rmsnorm import GROUP as SKIP_RMSNORM

#: name in ``rules`` → group, in the order the sweep tries them at a node
GROUPS = {"rmsnorm": RMSNORM, "skip-rmsnorm": SKIP_RMSNORM, "silu": SILU}


@dataclass(frozen=True)
class RulesConfig:
    rules: tuple[str, ...] = tuple(GROUPS)

    def __post_init__(self) -> None:
        unknown = [r for r in self.rules if r not in GROUPS]
        if unknown or not self.rules:
            raise ValueError(f"unknown rule group(s) {', '.join(unknown) or '(none given)'}; choices: {', '.join(GROUPS)}")


@register_pass
class FuseRules(RuleSweep):
    """RMSNorm, skip-RMSNorm and SiLU rewrite rules in one sweep (see module docstring)."""

    name = "fuse-rules"
    Config = RulesConfig

    def selected(self) -> Sequence[RuleGroup]:
        return tuple(g for name, g in GROUPS.items() if name in self.config.rules)
