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

from qcompiler.errors import InputError, QCError


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
    static_shapes: int | None = None

    def with_overrides(self, **kw: Any) -> QuantizeOptions:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in kw.items() if k in known and v is not None})


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
        raise InputError(f"{p}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(table)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build: Callable[[QuantizeOptions], str]
    needs_calibration: bool = False


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


def _weight_only(method: str, bits: int | None = None) -> Callable[[QuantizeOptions], str]:
    def build(o: QuantizeOptions) -> str:
        b = bits if bits is not None else o.bits
        return (
            f"canonicalize,quantize-weights{{bits={b},group_size={o.group_size},sym={o.sym},"
            f"method={method},clip={o.clip},lm_head={o.lm_head}}}"
        )

    return build


register_recipe(
    Recipe(
        "w4a16-rtn",
        "int4 weights (round to nearest, exact per-group min/max), float activations",
        _weight_only("rtn", 4),
    )
)
register_recipe(
    Recipe("w8a16-rtn", "int8 weights (round to nearest), float activations", _weight_only("rtn", 8))
)
