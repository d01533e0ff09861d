"""--kv-cache int8|int4 end to end: qc quantize, qc eval --through-cache, qc generate, bench timing, errors, a family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcompiler.bench import decode_speed_at
from qcompiler.cli import main
from qcompiler.eval import evaluate
from qcompiler.recipes import QuantizeOptions
from qcompiler.runtime import open_runner
from tests.conftest import family_export

SMALL = ["--recipe", "w4a16-rtn", "--group-size", "32"]
CALIB = ["--calib-samples", "4", "--seq-len", "64", "--calib"]


@pytest.fixture(scope="module")
def kv_models(synthetic_dir, synthetic_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic model with w4a16-rtn and a float, int8 and int4 cache."""
    model, _ = synthetic_dir
    root = tmp_path_factory.mktemp("kvcli")
    out = {}
    for kind in ("float", "int8", "int4"):
        extra = [] if kind == "float" else ["--kv-cache", kind, *CALIB, str(synthetic_text)]
        assert main(["quantize", str(model), str(root / kind), *SMALL, *extra]) == 0
        out[kind] = root / kind
    return out


def test_quantize_records_the_cache(kv_models: dict[str, Path]) -> None:
    q = json.loads((kv_models["int4"] / "quantization.json").read_text())
    assert q["options"]["kv_cache"] == "int4" and q["options"]["calib"]
    assert "quantize-kv-cache{bits=4" in q["pipeline"]
    assert q["report"]["kv_cache"]["layers"] == 2 and q["report"]["kv_cache"]["k"] == "PER_CHANNEL"
    f = json.loads((kv_models["float"] / "quantization.json").read_text())
    assert f["options"]["kv_cache"] == "float" and "calib" not in f["options"] and "kv_cache" not in f["report"]


def test_through_cache_eval_and_bytes(kv_models: dict[str, Path], synthetic_text: Path, capsys) -> None:
    res = {k: evaluate(p, synthetic_text, seq_len=64, max_tokens=256, progress=False, through_cache=True)
           for k, p in kv_models.items()}
    fp = res["float"].cache_bytes_per_token
    assert fp == 2 * 2 * 2 * 16 * 4  # K and V × 2 layers × 2 kv heads × 16 dims × fp32
    assert res["int8"].cache_bytes_per_token * 4 == fp and res["int4"].cache_bytes_per_token * 8 == fp
    # the float cache through the cache is the plain (prefill) evaluation, to float rounding
    plain = evaluate(kv_models["float"], synthetic_text, seq_len=64, max_tokens=256, progress=False)
    assert res["float"].perplexity == pytest.approx(plain.perplexity, rel=1e-4)
    d8 = abs(res["int8"].nll - res["float"].nll)
    d4 = abs(res["int4"].nll - res["float"].nll)
    assert 0 < d8 < d4 < 0.5, (d8, d4)
    assert main(["eval", str(kv_models["int8"]), "--text", str(synthetic_text), "--seq-len", "64", "--max-tokens",
                 "128", "--through-cache"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["through_cache"] is True and out["cache_bytes_per_token"] == fp // 4


def test_generate_and_decode_timing(kv_models: dict[str, Path], capsys) -> None:
    for kind in ("int8", "int4"):
        runner = open_runner(kv_models[kind], threads=1)
        assert len(list(runner.generate([5, 6, 7], 8))) == 8
        assert decode_speed_at(runner, 300, 3) > 0
    assert main(["generate", str(kv_models["int4"]), "--prompt", "the model", "--max-new-tokens", "6",
                 "--ignore-eos"]) == 0
    assert "6 tokens" in capsys.readouterr().err


def test_errors(synthetic_dir, synthetic_text: Path, tmp_path: Path, capsys) -> None:
    model, _ = synthetic_dir
    assert main(["quantize", str(model), str(tmp_path / "a"), *SMALL, "--kv-cache", "int8"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["quantize", str(model), str(tmp_path / "b"), *SMALL, "--kv-cache", "int8", *CALIB,
                 str(synthetic_text), "--target", "npu", "--sym"]) == 2
    assert "--kv-cache is not used" in capsys.readouterr().err
    assert main(["quantize", str(model), str(tmp_path / "c"), *SMALL, "--kv-cache", "int8", *CALIB,
                 str(synthetic_text), "--no-fuse"]) == 5
    assert "fused attention" in capsys.readouterr().err
    assert main(["quantize", str(model), str(tmp_path / "d"), *SMALL, "--kv-granularity", "tensor"]) == 2
    with pytest.raises(Exception, match="kv-cache"):
        QuantizeOptions(kv_cache="int2")


@pytest.mark.parametrize("model_type", ["qwen3"])
def test_family_with_qk_norm(model_type: str, tmp_path: Path) -> None:
    """A family whose keys pass a per-head RMSNorm before rotary: the cache is calibrated after both."""
    src = family_export(model_type) / "onnx"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} token{i % 13}" for i in range(1500)))
    outs = {}
    for kind in ("float", "int8", "int4"):
        extra = [] if kind == "float" else ["--kv-cache", kind, *CALIB, str(text)]
        assert main(["quantize", str(src), str(tmp_path / kind), *SMALL, *extra]) == 0
        outs[kind] = evaluate(tmp_path / kind, text, seq_len=64, max_tokens=256, progress=False, through_cache=True)
    q = json.loads((tmp_path / "int4" / "quantization.json").read_text())
    assert q["report"]["kv_cache"]["layers"] == 2
    assert outs["int8"].cache_bytes_per_token * 4 == outs["float"].cache_bytes_per_token
    assert abs(outs["int8"].nll - outs["float"].nll) < abs(outs["int4"].nll - outs["float"].nll) + 1e-3
    assert abs(outs["int4"].nll - outs["float"].nll) < 0.1
    assert np.isfinite(outs["int4"].perplexity)


def test_bench_rows_with_a_quantized_cache(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    model, _ = synthetic_dir
    out = tmp_path / "bench"
    assert main(["bench", str(model), "--text", str(synthetic_text), "--out", str(out), "--recipes", "w4a16-rtn",
                 "--kv-cache", "int4", "--calib", str(synthetic_text), "--eval-tokens", "256", "--eval-seq-len", "64",
                 "--prefill-tokens", "16", "--decode-tokens", "4", "--threads", "1", "--group-size", "32",
                 "--calib-samples", "4", "--seq-len", "64", "--decode-contexts", "64,300",
                 "--context-decode-tokens", "3"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert rows["fp32"]["cache_bytes_per_token"] == 8 * rows["w4a16-rtn"]["cache_bytes_per_token"]
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        assert set(r["decode_tok_s_at"]) == {"64", "300"} and all(v > 0 for v in r["decode_tok_s_at"].values())
    md = (out / "bench.md").read_text()
    assert "| cache B/token | decode tok/s @64 | decode tok/s @300 |" in md


def test_deploy_names_the_int4_cache_for_optimum(kv_models: dict[str, Path]) -> None:
    from qcompiler.deploy import optimum_problems

    assert not [p for p in optimum_problems(kv_models["int8"]) if "KV cache" in p]
    assert any("int4" in p and "head_size / 2" in p for p in optimum_problems(kv_models["int4"]))
