"""Deployable folders: Optimum's ORTModelForCausalLM and onnxruntime-genai load qcompiler output unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler import deploy
from qcompiler.cli import main
from qcompiler.errors import QCError
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from qcompiler.runtime import open_runner

PROMPT = [5, 60, 61, 62, 7, 90]  # token ids: the synthetic byte tokenizer has no words worth encoding


@pytest.fixture(scope="module")
def synthetic_int4(synthetic_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic model, int4 (MatMulNBits), with --genai."""
    out = tmp_path_factory.mktemp("deploy") / "w4"
    quantize(synthetic_dir[0], out, recipe="w4a16-rtn", options=QuantizeOptions(group_size=32), genai=True)
    return out


def _optimum_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(folder))
    assert model.can_use_cache  # it found the past_key_values inputs
    inp = torch.tensor([ids])
    out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def _op_types(folder: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


def test_optimum_loads_and_generates_quantized_folder(synthetic_int4: Path) -> None:
    assert deploy.optimum_problems(synthetic_int4) == []
    assert "MatMulNBits" in _op_types(synthetic_int4)
    ours = list(open_runner(synthetic_int4).generate(PROMPT, 12))
    assert _optimum_greedy(synthetic_int4, PROMPT, 12) == ours


def test_genai_config_matches_schema_and_graph(synthetic_int4: Path) -> None:
    cfg = json.loads((synthetic_int4 / deploy.GENAI_CONFIG).read_text())
    assert deploy.validate_genai_config(cfg, synthetic_int4) == []
    assert cfg["model"]["type"] == "llama" and cfg["model"]["vocab_size"] == 256
    dec = cfg["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"]) == (
        2, 4, 2, 16)
    assert cfg["search"]["past_present_share_buffer"] is False
    # the validator notices what genai would trip over
    broken = json.loads(json.dumps(cfg))
    del broken["model"]["vocab_size"]
    broken["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.key"
    broken["search"]["do_sample"] = "no"
    problems = deploy.validate_genai_config(broken)
    assert "missing 'model.vocab_size'" in problems
    assert "'search.do_sample' should be bool, got str" in problems
    broken["model"]["vocab_size"] = 256
    broken["search"]["do_sample"] = False
    assert deploy.validate_genai_config(broken, synthetic_int4) == [
        "decoder input 'past.0.key' (past_key_names) is not a graph input",
        "decoder input 'past.1.key' (past_key_names) is not a graph input",
    ]


@pytest.mark.skipif(not deploy.genai_available(), reason="onnxruntime-genai is not installed")
def test_genai_generates_same_tokens(synthetic_int4: Path) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(synthetic_int4))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(PROMPT, dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    expected = list(open_runner(synthetic_int4).generate(PROMPT, 10, eos_token_id=1))
    assert got == expected


def test_optimum_problems_are_named(synthetic_dir, tmp_path: Path) -> None:
    src = synthetic_dir[0]
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    proto.opset_import.append(onnx.helper.make_opsetid("qcompiler", 1))
    onnx.save(proto, str(folder / "model.onnx"))
    (folder / "config.json").unlink()
    problems = deploy.optimum_problems(folder)
    assert any("no config.json" in p for p in problems)
    assert any("qcompiler's own ops" in p for p in problems)
    with pytest.raises(QCError, match=r"no config\.json"):
        deploy.genai_config(folder)
    assert main(["deploy", str(folder)]) == 1


def test_genai_needs_a_kv_cache(synthetic_nokv_dir) -> None:
    with pytest.raises(QCError, match="no KV cache"):
        deploy.genai_config(synthetic_nokv_dir[0])


def test_plain_bytelevel_decoder_is_left_alone(synthetic_dir, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(synthetic_dir[0], folder)
    before = (folder / "tokenizer.json").read_bytes()
    assert deploy.normalize_tokenizer_decoder(folder) is False
    assert (folder / "tokenizer.json").read_bytes() == before


@pytest.mark.slow
def test_real_model_deploys_to_optimum_and_genai(smollm2_kv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w4"
    assert main(["-q", "quantize", str(smollm2_kv), str(out), "--recipe", "w4a16-rtn", "--genai"]) == 0
    # Optimum loads the folder as written and talks
    assert "Paris" in deploy.optimum_generate(out, "The capital of France is", 8)
    # the GGUF-converted tokenizer got a plain ByteLevel decoder, decoding exactly as before
    from tokenizers import Tokenizer

    old, new = Tokenizer.from_file(str(smollm2_kv / "tokenizer.json")), Tokenizer.from_file(str(out / "tokenizer.json"))
    assert old.to_str() != new.to_str()
    sample = list(range(0, old.get_vocab_size(), 7))
    assert old.decode(sample) == new.decode(sample)
    assert old.encode("The capital of France is").ids == new.encode("The capital of France is").ids
    cfg = json.loads((out / deploy.GENAI_CONFIG).read_text())
    assert deploy.validate_genai_config(cfg, out) == []
    assert cfg["model"]["eos_token_id"] == 2 and cfg["model"]["decoder"]["num_hidden_layers"] == 30
    if not deploy.genai_available():
        pytest.skip("onnxruntime-genai is not installed: genai_config.json validated against the documented schema only")
    ids, text = deploy.genai_generate(out, "The capital of France is", 8)
    assert "Paris" in text
    # genai encodes without BOS; with the same prompt ids our runner generates the same tokens
    prompt = new.encode("The capital of France is", add_special_tokens=False).ids
    assert ids == list(open_runner(out).generate(prompt, 8, eos_token_id=2))
    assert main(["deploy", str(out), "--check", "--max-new-tokens", "4"]) == 0
    assert "genai generate:" in capsys.readouterr().out


def test_check_names_a_runtime_failure_in_one_line(synthetic_int4: Path, monkeypatch, capsys) -> None:
    """``qc deploy --check``: an error raised while a runtime generates is a ``qc: error`` line (exit 3), no traceback."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def fail(*_a, **_k):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got: 64 Expected: 32\nmore detail")

    monkeypatch.setattr(deploy, "optimum_generate", fail)
    rc = main(["deploy", str(synthetic_int4), "--check"])
    err = capsys.readouterr().err
    assert rc != 0 and "optimum could not generate with it" in err and "Got: 64 Expected: 32" in err
    assert "Traceback" not in err and "more detail" not in err
