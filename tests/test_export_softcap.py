"""Attention soft-capping survives the export: a config that sets ``attn_logit_softcapping`` is
traced with transformers' eager attention at every dtype (its SDPA path drops the cap).

The tiny ``gemma2-softcap`` variant (``qcompiler.families.tiny.TINY_VARIANTS``: caps 1.0 and
2.0, large scores, sliding window 4 on layer 0) makes both caps change the logits, so matching
transformers' eager model — and not its SDPA model — shows the cap is in the graph.
"""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.export import needs_eager_attention
from qcompiler.families.tiny import VOCAB
from tests.conftest import family_export

VARIANT = "gemma2-softcap"
IDS = np.random.default_rng(5).integers(0, VOCAB, 12)  # longer than the sliding window (4)


def _hf_logits(folder, attn: str, **config: object) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn, **config).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)[None]).logits[0].numpy()


def test_softcapped_export_equals_eager_not_sdpa() -> None:
    from qcompiler.runtime import open_runner

    base = family_export(VARIANT)
    eager = _hf_logits(base / "hf", "eager")
    got = open_runner(base / "onnx", threads=1).logits(IDS)
    assert np.abs(got - eager).max() < 1e-4, "the export is not transformers' eager (soft-capped) model"
    sdpa = _hf_logits(base / "hf", "sdpa")
    assert np.abs(sdpa - eager).max() > 1e-2, "the test model's attention soft-cap does not matter"
    # the final logit soft-cap is in the graph too: without it transformers' logits differ
    uncapped = _hf_logits(base / "hf", "eager", final_logit_softcapping=None)
    assert np.abs(uncapped - eager).max() > 1e-2
    # the sliding window (layer 0) is shorter than the window and matters: the fused tests see it
    assert np.abs(_hf_logits(base / "hf", "eager", sliding_window=len(IDS)) - eager).max() > 1e-3
    # and so is the attention cap of the cached (decode) path
    through = open_runner(base / "onnx", threads=1).logits_through_cache(IDS, prefill=5)
    assert np.abs(through - eager).max() < 1e-4


@pytest.mark.parametrize("model_type,want", [
    ("gemma2", ["attn_logit_softcapping"]),  # its default config sets 50
    ("gemma3_text", []),  # field present, null by default
    ("llama", []),
])
def test_eager_attention_fields(model_type: str, want: list[str]) -> None:
    from transformers import AutoConfig

    assert needs_eager_attention(AutoConfig.for_model(model_type)) == want
