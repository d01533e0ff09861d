"""tools/ood_ablate.py: the gated model is the compiled model (g = 1) and its W8A16 form (g = 0) exactly."""

from __future__ import annotations

import json

import numpy as np

from qcompiler.eval import evaluate_windows
from qcompiler.irutil import save_model
from qcompiler.runtime import DecoderRunner, open_runner
from tests.helpers import WINDOW
from tests.passes.w8a8_util import compile_model, l2_rel, shared_calibrator
from tools import ood_ablate


def _folder(model, tmp, src):
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model.onnx")
    for f in src.iterdir():
        if f.name not in ("model.onnx", "model.onnx_data"):
            (tmp / f.name).write_bytes(f.read_bytes())
    return tmp


def test_gates_select_float_or_quantized(synthetic_nokv_dir, synthetic_text, tmp_path_factory, tmp_path) -> None:
    folder, _ = synthetic_nokv_dir
    calib = shared_calibrator(tmp_path_factory, folder, synthetic_text)
    qdq = "canonicalize,insert-qdq{act=static,dtype=uint8,sym=false"
    quant = _folder(compile_model(folder, qdq + "}", calib)[0], tmp_path / "q", folder)
    w8a16 = _folder(compile_model(folder, qdq + ",fallback_error=1e-12}", calib)[0], tmp_path / "w", folder)
    proto, quantizers = ood_ablate.gate_model(quant)
    assert len(quantizers) == 8  # q/k/v, o, gate/up, down in 2 layers
    sess = ood_ablate.session(proto, quant, None)
    runner = DecoderRunner(sess)

    def logits(g):
        feeds = runner.feeds(WINDOW)
        feeds[ood_ablate.GATES] = np.asarray(g, np.float32)
        return sess.run(["logits"], feeds)[0][0]

    # x + 1·(x̂ − x) is x̂ up to an ulp of x, which can move a rounding tie of a later quantizer: 2e-3
    # (the float ablation's own noise is far below the effects it measures, 1e-1 KL on SmolLM2)
    assert l2_rel(open_runner(quant, optimize=False).logits(WINDOW), logits(np.ones(8))) < 2e-3
    assert l2_rel(open_runner(w8a16, optimize=False).logits(WINDOW), logits(np.zeros(8))) < 1e-5
    # one input in float lies between the two
    mixed = logits(np.eye(8)[0] == 0)
    assert 0 < l2_rel(logits(np.zeros(8)), mixed) < l2_rel(logits(np.zeros(8)), logits(np.ones(8))) * 1.5

    out = tmp_path / "abl"
    text = tmp_path / "t.txt"
    text.write_text(synthetic_text.read_text())
    assert ood_ablate.main([str(quant), "--reference", str(folder), "--out", str(out), "--text", f"t={text}",
                            "--tokens", "64", "--seq-len", "64", "--groups", "layer-role"]) == 0
    doc = json.loads((out / "ablate.json").read_text())
    assert {r["value"] for r in doc["rows"]} >= {"layer 0", "layer 1"}
    assert all(r["float_one"]["t"]["kl"] >= 0 for r in doc["rows"])
    assert doc["all_float"]["t"][1] <= doc["all_quantized"]["t"][1]
    # the numbers are qc eval's: the float model's perplexity, and g = 1 is the compiled model
    win = ood_ablate.mid_windows(folder, text.read_text(), 64, 64)
    ref = evaluate_windows(open_runner(folder), win, progress=False)
    assert abs(doc["fp32"]["t"] / ref.perplexity - 1) < 1e-6
    compiled = evaluate_windows(open_runner(quant, optimize=False), win, open_runner(folder), progress=False)
    assert abs(doc["all_quantized"]["t"][0] / compiled.perplexity - 1) < 1e-3
    assert abs(doc["all_quantized"]["t"][1] - compiled.kl) < 1e-3 * compiled.kl + 1e-6
    # --groups role: one row per role, each the union of that role's inputs over the layers
    assert ood_ablate.main([str(quant), "--reference", str(folder), "--out", str(out), "--text", f"t={text}",
                            "--tokens", "64", "--seq-len", "64", "--groups", "role"]) == 0
    rows = json.loads((out / "ablate.json").read_text())["rows"]
    assert rows and all(r["value"].startswith("role ") for r in rows)
    assert sorted(i for r in rows for i in r["members"]) == list(range(8))
