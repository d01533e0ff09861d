"""Every described family, on its tiny random model (2 layers), through the cpu target's fusions.

For ``w4a16-rtn`` and ``w8a8-dynamic`` the fused graph must hold one
``GroupQueryAttention`` per decoder layer and decode the same greedy tokens as the same
recipe compiled without fusions (``fuse=False``).  Families whose attention the fusions
do not cover yet are listed in ``NOT_FUSED`` with the reason; for them only the tokens
are checked (a fusion must never change the function).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcompiler.families import FAMILIES
from qcompiler.families.tiny import VOCAB
from tests.conftest import family_export

LAYERS = 2
PROMPT = [int(t) for t in np.random.default_rng(11).integers(0, VOCAB, 8)]
STEPS = 16

#: family → why its attention is not fused to GroupQueryAttention (the matcher's words,
#: from ``qcompiler.models.attention.match_attention``); none since issue 24
NOT_FUSED: dict[str, str] = {}


def _compile(model_type: str, recipe: str, out: Path, fuse: bool) -> Path:
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    quantize(family_export(model_type) / "onnx", out, recipe=recipe, options=QuantizeOptions(group_size=32, fuse=fuse))
    return out


def _ops(folder: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(folder / "model.onnx", load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _tokens(folder: Path) -> list[int]:
    from qcompiler.runtime import open_runner

    return [int(t) for t in open_runner(folder, threads=1).generate(PROMPT, STEPS)]


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_attention_fused_and_tokens_equal(model_type: str, recipe: str, tmp_path: Path) -> None:
    fused = _compile(model_type, recipe, tmp_path / "fused", fuse=True)
    plain = _compile(model_type, recipe, tmp_path / "plain", fuse=False)
    gqa = _ops(fused).get("GroupQueryAttention", 0)
    if model_type in NOT_FUSED:
        assert gqa == 0, f"{model_type} now fuses: drop it from NOT_FUSED"
    else:
        assert gqa == LAYERS, f"{model_type}: {gqa} GroupQueryAttention for {LAYERS} layers"
    assert _tokens(fused) == _tokens(plain)
