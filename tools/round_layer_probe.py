#!/usr/bin/env python3
"""One decoder layer of a real model: held-window layer-output loss of RTN / GPTQ starts and learned variants.

    python tools/round_layer_probe.py LAYER [MODEL_DIR] [CALIB]

The layer's input comes from the float layers before it (128 calibration windows, first 128
tokens); each variant quantizes every linear of the layer (g128 asym) and reports the mean
squared error of the layer's output against the float layer on the same input, on the last 8
windows (training uses the first 32), plus its CPU seconds.  The numbers behind
docs/weight_only.md "Learned rounding around GPTQ".
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
from qcompiler.passes.canonicalize import Canonicalize
from qcompiler.passes.round import Round, RoundConfig

from qcompiler.calibrate.windows import load_windows
from qcompiler.irutil import linear_weight, load_model
from qcompiler.layerwise import LayerwiseRunner
from qcompiler.onnx_torch import TorchGraph, to_torch
from qcompiler.pipeline import PassContext
from qcompiler.quant.emit import stored_spec
from qcompiler.quant.learned_round import LearnedRounding
from qcompiler.spec import weight_spec

TRAIN, HELD, WINDOWS = 32, 8, 128


def main() -> None:
    torch.set_num_threads(1)
    layer_index = int(sys.argv[1])
    model_dir = sys.argv[2] if len(sys.argv) > 2 else "runs/smollm2-fp32"
    calib = sys.argv[3] if len(sys.argv) > 3 else "/usr/share/common-licenses/GPL-3"
    model = load_model(f"{model_dir}/model.onnx")
    Canonicalize()(model)
    runner = LayerwiseRunner(model, load_windows(model_dir, calib, WINDOWS, 512).ids[:, :128], progress=False)
    runner.start()
    for _ in range(layer_index):
        runner.advance()
    layer = runner.layers[layer_index]
    in_name = layer.input.name
    proto, inputs = runner.layer_graph(layer_index, [layer.output.name])
    graph = TorchGraph.from_model(proto, model)
    members = list(layer.linears.values())
    weights = {}
    for node in members:
        name = linear_weight(node)[0].name  # type: ignore[index]
        weights[name] = (graph.constants[name].numpy(), stored_spec(weight_spec(node) or RoundConfig().spec(),
                                                                    model.graph, node))
    hidden, static = [], []
    for w in range(WINDOWS):
        feeds = {k: to_torch(v) for k, v in runner.layer_feeds(layer_index, w, inputs).items()}
        static.append(graph.fold(feeds, {in_name, *weights}))
        hidden.append(feeds[in_name])
    with torch.no_grad():
        targets = [graph({in_name: hidden[w]}, static=static[w])[0] for w in range(WINDOWS)]
    held = list(range(WINDOWS - HELD, WINDOWS))

    def loss(windows: list[int], over: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(torch.mean((graph({in_name: hidden[w]}, over, static=static[w])[0] - targets[w]) ** 2)
                   for w in windows) / len(windows)

    probe = Round(RoundConfig(init="gptq"))
    probe.context = PassContext()
    t0 = time.process_time()
    starts = probe._gptq_starts(graph, in_name, hidden[:-HELD], static[:-HELD], members, weights)
    print(f"gptq start: {time.process_time() - t0:.1f} CPU s")

    def run(name: str, init: str, iters: int, lr: float, v_only: bool = False, adam: float = 0.0) -> None:
        rs = {n: LearnedRounding(w, s, 0.5, start=starts[n] if init == "gptq" else None)
              for n, (w, s) in weights.items()}

        def fake() -> dict[str, Any]:
            return {n: q.fake() for n, q in rs.items()}

        with torch.no_grad():
            first = float(loss(held, fake()))
        rng, order = np.random.default_rng(0), []
        params = [p for q in rs.values() for p in ([q.v] if v_only else q.params)]
        opt = torch.optim.Adam(params, lr=adam) if adam else None
        t0 = time.process_time()
        for t in range(iters):
            if not order:
                order = list(rng.permutation(TRAIN))
            loss([order.pop(0)], fake()).backward()
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = adam * (1 - t / iters)
                opt.step()
                opt.zero_grad()
                with torch.no_grad():
                    for q in rs.values():
                        q.v.clamp_(-0.5, 0.5)
                        q.alpha.clamp_(0.5, 1)
                        q.beta.clamp_(0.5, 1)
            else:
                for q in rs.values():
                    q.step(lr * (1 - t / iters), learn_range=not v_only)
        with torch.no_grad():
            last = float(loss(held, fake()))
        print(f"{name:28s} start {first:.4g} -> held {last:.4g}  ({time.process_time() - t0:.0f} CPU s)", flush=True)

    run("rtn", "rtn", 0, 0)
    run("rtn sign50 lr.02", "rtn", 50, 0.02)
    run("gptq sign50 lr.02", "gptq", 50, 0.02)
    run("gptq sign50 V lr.005", "gptq", 50, 0.005, v_only=True)
    run("gptq adam50 lr1e-3", "gptq", 50, 0, adam=1e-3)
    run("gptq sign50 lr.005", "gptq", 50, 0.005)


if __name__ == "__main__":
    main()
