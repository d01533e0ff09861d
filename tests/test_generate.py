"""qc generate: KV-cache generation through ONNX Runtime, streamed with the tokenizer's incremental decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcompiler.cli import main
from qcompiler.commands.generate import eos_ids, prompt_ids, stream_text
from qcompiler.data import load_tokenizer
from qcompiler.runtime import open_runner


def test_kv_generation_equals_full_recompute(synthetic_dir, synthetic_nokv_dir) -> None:
    """The same seeded weights with and without a KV cache generate the same greedy tokens."""
    ids = list(prompt_ids(synthetic_dir[0], "the model quantizes"))
    kv = list(open_runner(synthetic_dir[0]).generate(ids, 16))
    full = list(open_runner(synthetic_nokv_dir[0]).generate(ids, 16))
    assert len(kv) == 16 and kv == full
    # and it is greedy: each token is the argmax of the full-sequence logits
    logits = open_runner(synthetic_nokv_dir[0]).logits(np.array(ids + kv[:-1]))
    assert list(logits[len(ids) - 1 :].argmax(-1)) == kv


def test_cli_streams_tokens(synthetic_dir, capsys) -> None:
    model, _ = synthetic_dir
    rc = main(["generate", str(model), "--prompt", "the model", "--max-new-tokens", "12", "--ignore-eos"])
    assert rc == 0
    out, err = capsys.readouterr()
    expected = list(open_runner(model).generate(prompt_ids(model, "the model"), 12))
    text = "".join(piece for _, piece in stream_text(model, iter(expected)))
    assert out == text + "\n"
    assert "[12 tokens in" in err and "greedy, KV cache" in err


def test_sampling_is_seeded(synthetic_dir, capsys) -> None:
    model, _ = synthetic_dir
    args = ["generate", str(model), "--prompt", "graph", "--max-new-tokens", "24", "--ignore-eos",
            "--temperature", "1.5", "--top-k", "50"]
    outs = []
    for seed in ("3", "3", "4"):
        assert main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_stream_decode_handles_split_characters(synthetic_dir) -> None:
    """A multi-byte character arrives over several byte tokens; it prints once, whole."""
    model, _ = synthetic_dir
    tok = load_tokenizer(model)
    ids = tok.encode("é ü €", add_special_tokens=False).ids
    assert len(ids) > 5  # byte-level: one token per byte
    pieces = [p for _, p in stream_text(model, iter(ids))]
    assert "".join(pieces) == "é ü €"
    assert "" in pieces  # the first byte of a character prints nothing yet


def test_eos_and_errors(synthetic_dir, tmp_path: Path) -> None:
    model, _ = synthetic_dir
    assert eos_ids(model) == [1]
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 3
    assert main(["generate", str(model), "--prompt", "x", "--max-new-tokens", "0"]) == 3
    assert main(["generate", str(model), "--prompt", "x", "--chat"]) == 3  # no chat template


@pytest.mark.slow
def test_fp32_and_int4_still_talk(smollm2_kv: Path, tmp_path: Path, capsys) -> None:
    int4 = tmp_path / "w4"
    assert main(["-q", "quantize", str(smollm2_kv), str(int4), "--recipe", "w4a16-rtn"]) == 0
    capsys.readouterr()
    prompt = "The capital of France is"
    for model in (smollm2_kv, int4):
        assert main(["generate", str(model), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
        out = capsys.readouterr().out
        assert "Paris" in out, (model, out)
        ids = list(open_runner(model).generate(prompt_ids(model, prompt), 8, eos_ids(model)))
        assert out == load_tokenizer(model).decode(ids, skip_special_tokens=True) + "\n"
    assert main(["generate", str(int4), "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
