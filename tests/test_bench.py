"""qc bench: every row in its own process, the anchors, failing rows, the report files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qcompiler.bench import BenchConfig, BenchResult, CachedLogits, measure_speed, resolve_rows, run_bench
from qcompiler.cli import main
from qcompiler.errors import QCError
from qcompiler.eval import evaluate
from qcompiler.recipes import QuantizeOptions
from qcompiler.runtime import open_runner

# Small enough for milliseconds per window on the synthetic model.
SMALL = ["--eval-tokens", "512", "--eval-seq-len", "64", "--prefill-tokens", "32", "--decode-tokens", "8",
         "--threads", "1", "--group-size", "32", "--calib-samples", "4", "--seq-len", "64"]


def test_cli_bench_recipes_and_all_anchors(synthetic_dir, synthetic_text: Path, tmp_path: Path, capsys,
                                          monkeypatch) -> None:
    model, _ = synthetic_dir
    out = tmp_path / "bench"
    cwd = tmp_path / "cwd"  # ORT's quantizers write scratch models into the working folder
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc = main(["bench", str(model), "--text", str(synthetic_text), "--calib", str(synthetic_text), "--out", str(out),
               "--recipes", "w4a16-rtn,w8a16-rtn,anchors", "--keep-models", *SMALL])
    assert rc == 0
    assert not list(cwd.iterdir()), "a bench run left files in the working folder"
    data = json.loads((out / "bench.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["fp32", "w4a16-rtn", "w8a16-rtn", "ort-rtn", "ort-hqq", "ort-dynamic", "ort-static"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        assert r["perplexity"] > 1 and r["size_bytes"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert r["row_cpu_s"] > 0 and r["row_wall_s"] > 0
        if name != "fp32":
            assert r["compile_s"] > 0 and r["compile_cpu_s"] > 0 and r["compile_peak_rss_mb"] > 50
            assert 0 < r["kl"] < 5 and 0 < r["top1"] <= 1
            assert r["delta_pct"] == pytest.approx(100 * (r["perplexity"] / rows["fp32"]["perplexity"] - 1))
            assert r["size_bytes"] < rows["fp32"]["size_bytes"]
            assert (out / r["model_dir"] / "model.onnx").is_file()
    assert rows["fp32"]["kl"] == 0 and rows["fp32"]["top1"] == 1
    # int8 weights are closer to the float model than int4 weights
    assert rows["w8a16-rtn"]["kl"] < rows["w4a16-rtn"]["kl"]
    # the cached reference logits give exactly what qc eval computes against the float folder
    ev = evaluate(out / "models" / "w4a16-rtn", synthetic_text, reference_dir=model, seq_len=64, max_tokens=512,
                  progress=False)
    assert rows["w4a16-rtn"]["perplexity"] == pytest.approx(ev.perplexity, rel=1e-6)
    assert rows["w4a16-rtn"]["kl"] == pytest.approx(ev.kl, rel=1e-5, abs=1e-9)
    assert rows["w4a16-rtn"]["top1"] == pytest.approx(ev.top1_agreement)
    md = (out / "bench.md").read_text()
    assert md == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    assert BenchResult.from_dict(data).to_markdown() == md  # bench.json holds everything the table shows
    for name in rows:
        assert f"| {name} | ok |" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("work-*")), "the scratch folder (reference logits) must be removed"


PLUGIN = textwrap.dedent(
    """
    import os, signal
    from qcompiler.recipes import Recipe, register_recipe

    register_recipe(Recipe("test-bad-option", "a recipe whose pipeline is invalid",
                           lambda o: "canonicalize,quantize-weights{bits=5}"))

    def _die(o):
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does

    register_recipe(Recipe("test-killed", "a recipe whose process is killed", _die))

    def _bug(o):
        raise RuntimeError("bug in a recipe")

    register_recipe(Recipe("test-bug", "a recipe with a bug", _bug))
    """
)


@pytest.fixture
def failing_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes that fail three ways, registered in this process and each row's process via $QC_PLUGINS."""
    (tmp_path / "qc_test_failing_recipes.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("QC_PLUGINS", "qc_test_failing_recipes")


def test_failing_rows_leave_the_rest_of_the_table(
    failing_recipes: None, synthetic_dir, synthetic_text: Path, tmp_path: Path
) -> None:
    model, _ = synthetic_dir
    cfg = BenchConfig(eval_tokens=256, seq_len=64, prefill_tokens=16, decode_tokens=4, threads=1)
    res = run_bench(model, synthetic_text, recipes="test-bad-option,w4a16-rtn,test-killed,test-bug,ort-static",
                    out_dir=tmp_path / "b", config=cfg, options=QuantizeOptions(group_size=32))
    rows = {r.name: r for r in res.rows}
    assert rows["fp32"].ok and rows["w4a16-rtn"].ok
    assert rows["w4a16-rtn"].perplexity is not None and rows["w4a16-rtn"].kl > 0
    bad = rows["test-bad-option"]
    assert bad.status == "failed" and "bits must be 2, 3, 4 or 8" in bad.error
    assert rows["test-killed"].status == "failed" and rows["test-killed"].error.startswith("killed by SIGKILL")
    assert rows["test-bug"].status == "failed" and rows["test-bug"].error == "RuntimeError: bug in a recipe"
    assert rows["ort-static"].status == "skipped" and "--calib" in rows["ort-static"].error
    assert all(r.perplexity is None for r in res.rows if not r.ok)
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| test-killed | failed: killed by SIGKILL (out of memory?) |" in md
    assert "| w4a16-rtn | ok |" in md
    assert "RuntimeError: bug in a recipe" in (tmp_path / "b" / "logs" / "test-bug.log").read_text()  # the traceback
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["status"] for r in saved["rows"]] == ["ok", "failed", "ok", "failed", "failed", "skipped"]


def test_row_names() -> None:
    from qcompiler.anchors import ANCHORS
    from qcompiler.recipes import available_recipes

    assert resolve_rows("anchors") == [(a, "anchor") for a in ANCHORS]
    assert resolve_rows(["w4a16-rtn", "ort-rtn,w4a16-rtn", "fp32"]) == [("w4a16-rtn", "recipe"), ("ort-rtn", "anchor")]
    assert [n for n, _ in resolve_rows("all")] == [*available_recipes(), *ANCHORS]
    with pytest.raises(QCError, match="unknown recipe/anchor 'w5a16'"):
        resolve_rows("w4a16-rtn,w5a16")


def test_bench_errors_before_any_work(synthetic_dir, tmp_path: Path) -> None:
    model, _ = synthetic_dir
    with pytest.raises(QCError, match="no such text"):
        run_bench(model, tmp_path / "missing.txt", recipes="w4a16-rtn")
    assert main(["bench", str(tmp_path / "nope"), "--text", str(tmp_path)]) == 3


def test_measure_speed_and_cached_logits(synthetic_dir, synthetic_nokv_dir, tmp_path: Path) -> None:
    model, _ = synthetic_dir
    runner = open_runner(model, threads=1)
    prompt = np.arange(40) % 200
    sp = measure_speed(runner, prompt, decode_tokens=5, repeats=2)
    assert sp.prefill_tok_s > 0 and sp.decode_tok_s > 0
    nokv = measure_speed(open_runner(synthetic_nokv_dir[0], threads=1), prompt, decode_tokens=5, repeats=1)
    assert nokv.decode_tok_s is None  # no KV cache: decode speed is not measured
    windows = np.stack([prompt[:20], prompt[20:]])
    for i, w in enumerate(windows):
        np.save(tmp_path / f"{i}.npy", runner.logits(w))
    cached = CachedLogits(tmp_path, windows)
    np.testing.assert_array_equal(cached.logits(windows[1]), runner.logits(windows[1]))
    with pytest.raises(QCError):
        cached.logits(prompt[:20] + 1)


def test_a_model_folder_built_elsewhere_is_a_row(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    import shutil

    model, _ = synthetic_dir
    copy = tmp_path / "prebuilt"
    shutil.copytree(model, copy)
    assert resolve_rows(f"w4a16-rtn,dir:{copy}") == [("w4a16-rtn", "recipe"), (f"dir:{copy}", "folder")]
    with pytest.raises(QCError):
        resolve_rows(f"dir:{tmp_path / 'missing'}")
    rc = main(["bench", str(model), "--text", str(synthetic_text), "--out", str(tmp_path / "b"),
               "--recipes", f"dir:{copy}", "--no-speed", *SMALL[:8]])  # no quantization options: nothing compiles
    assert rc == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]}
    assert rows["prebuilt"]["status"] == "ok" and rows["prebuilt"]["kind"] == "folder"
    assert rows["prebuilt"]["kl"] < 1e-6 and rows["prebuilt"]["compile_s"] is None  # the same model, nothing compiled
    assert copy.is_dir()  # a folder row is read, never removed


@pytest.mark.parametrize("elem, name", [(1, "fp32"), (10, "fp16"), (16, "bf16")])
def test_reference_row_is_named_after_the_models_float_type(tmp_path: Path, elem: int, name: str) -> None:
    import onnx
    from onnx import helper

    from qcompiler.bench import reference_name

    x = helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", elem, ["b", "s", 8])
    node = helper.make_node("Cast", ["input_ids"], ["logits"], to=elem)
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y])), tmp_path / "model.onnx")
    assert reference_name(tmp_path) == name
