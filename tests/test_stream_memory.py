"""Peak RSS of ``qc export --stream`` and ``qc quantize --recipe w4a16-rtn``, measured in a child process.

The checkpoint (random bf16, 124 MB, written by ``tools/make_random_checkpoint.py``) is several
times larger than what each command may add on top of its own imports, so a stage that held
the model (or a whole fp32 copy of its largest tensor more than once) fails the bound:

* export: ``peak − imports ≤ 5·chunk`` (+ slack for the graph and allocator), the formula of
  ``qcompiler.export_stream`` (``stream_peak_bytes``);
* RTN quantize: ``peak − imports ≤ largest tensor + 3 bytes × largest linear's values +
  fusion/ORT modules`` (``docs/scaling.md``, "Peak memory of qc quantize").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
           num_key_value_heads=4, vocab_size=16000, rope_theta=10000.0, max_position_embeddings=1024)
MiB = 1 << 20

_CHILD = """
import json, sys
from qcompiler.memory import peak_rss_mb
import numpy, onnx, onnx_ir, onnxruntime, qcompiler.export, qcompiler.export_stream, qcompiler.quantize
if sys.argv[1] == "quantize":  # the modules every run loads whatever the model (passes, ORT's shape inference)
    from qcompiler.pipeline import get_pass
    from qcompiler.shapes import _symbolic_shape_inference_class
    _symbolic_shape_inference_class()
    get_pass("quantize-weights"), get_pass("fuse-rmsnorm")
base = peak_rss_mb()
kind, src, out, arg = sys.argv[1:5]
if kind == "export":
    from qcompiler.export import export
    export(src, out, stream=True, dtype="fp32", max_memory=int(arg))
else:
    from qcompiler.quantize import quantize
    quantize(src, out, recipe=arg)
print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb()}))
"""


def _child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.make_random_checkpoint import build

    folder = tmp_path_factory.mktemp("ckpt") / "hf"
    build(folder, dict(CFG), shard_bytes=60_000_000)
    return folder


def test_streaming_export_and_rtn_peak_rss(checkpoint: Path, tmp_path: Path) -> None:
    from qcompiler.export_stream import BASE_MB, chunk_for_budget

    ckpt_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    budget = (BASE_MB + 10) * MiB
    chunk = chunk_for_budget(budget)
    assert chunk == 2 * MiB  # 10 MiB over the base buys 2 MiB blocks (5× for a bf16 → fp32 copy)
    exp = _child("export", str(checkpoint), str(tmp_path / "fp32"), str(budget))
    grown = (exp["peak_mb"] - exp["base_mb"]) * MiB
    assert grown <= 5 * chunk + 24 * MiB, exp  # graph, allocator slack
    assert grown < ckpt_bytes / 4, exp  # the 124 MB checkpoint (248 MB as fp32) is never resident

    from qcompiler.irutil import load_model

    model = load_model(tmp_path / "fp32" / "model.onnx")
    sizes = {n: v.const_value.nbytes for n, v in model.graph.initializers.items() if v.const_value is not None}
    del model
    largest = max(sizes.values())  # embedding / lm_head, fp32
    linear_values = 2048 * 768
    q = _child("quantize", str(tmp_path / "fp32"), str(tmp_path / "w4"), "w4a16-rtn")
    grown = (q["peak_mb"] - q["base_mb"]) * MiB
    bound = largest + 3 * linear_values + 16 * 4 * MiB + 200 * MiB  # + RTN blocks, + fusion modules (sympy)
    assert grown <= bound, (q, bound / MiB)
    assert grown < 2 * sum(sizes.values()) / 3, (q, sum(sizes.values()) / MiB)  # well under the fp32 model


def test_max_memory_is_checked_before_any_work(synthetic_dir: tuple[Path, object], tmp_path: Path) -> None:
    """A bound below the estimate stops quantize and export with one line and nothing written; one above passes."""
    from qcompiler.errors import QCError
    from qcompiler.export import export
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions

    src, _ = synthetic_dir
    with pytest.raises(QCError, match=r"--max-memory 100M: quantizing this model needs about .* largest tensor"):
        quantize(src, tmp_path / "q", recipe="w4a16-rtn", options=QuantizeOptions(max_memory="100M"))
    assert not (tmp_path / "q").exists()
    quantize(src, tmp_path / "ok", recipe="w4a16-rtn", options=QuantizeOptions(max_memory="8G"))
    assert (tmp_path / "ok" / "model.onnx").is_file()

    from tools.make_random_checkpoint import build

    hf = build(tmp_path / "hf", dict(CFG, num_hidden_layers=1, vocab_size=512, intermediate_size=256,
                                     hidden_size=128, num_attention_heads=4, num_key_value_heads=2), 10**9)
    assert hf > 0
    with pytest.raises(QCError, match="below the streaming export's minimum"):
        export(str(tmp_path / "hf"), tmp_path / "e", stream=True, max_memory=64 << 20)
    assert not (tmp_path / "e").exists()


def test_max_memory_without_stream_names_the_fix(tmp_path: Path) -> None:
    from qcompiler.errors import QCError
    from qcompiler.export import export
    from tools.make_random_checkpoint import build

    build(tmp_path / "hf", dict(CFG, num_hidden_layers=1), 10**9)  # 33 M values: ~290 MiB for the normal export
    with pytest.raises(QCError, match="pass --stream"):
        export(str(tmp_path / "hf"), tmp_path / "e", max_memory=200 << 20)
    assert not (tmp_path / "e").exists()
