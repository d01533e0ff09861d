"""round: learned rounding (AutoRound-style) per decoder layer, against the whole layer's output.

Each decoder linear ``W[K, N]`` is written as the group-wise grid of
:mod:`qcompiler.quant.learned_round`: ``Ŵ = s(α, β)·(clamp(⌊W/s + V⌉ + z) − z)`` with one
rounding offset ``V ∈ [−½, ½]`` per weight and range shrinks ``α, β ∈ [min_clip, 1]`` per
group (``V = 0, α = β = 1`` is RTN).  For decoder layer ``i`` with input ``h_i`` (from the
layers ``0..i−1`` already quantized, as GPTQ does) and all its linears' parameters ``θ``::

    θ* = argmin_θ  E_windows ‖ f_i(h_i; Ŵ(θ)) − y_i ‖²

where ``f_i`` is the whole layer (attention, MLP, norms and residuals: block-wise
reconstruction, so the errors of q/k/v/o/gate/up/down are traded against each other
through the layer's non-linearities), and the target ``y_i`` is

* ``target=same`` (default): the float layer on the same quantized input, ``y_i = f_i(h_i; W)``;
* ``target=float``: the float layer on the *float* model's stream, ``y_i = f_i(h_i^float; W)``
  (so the layer also corrects the error its input carries).  On SmolLM2 it fits the
  calibration domain: perplexity on source code +45% against +23% with ``same``
  (docs/weight_only.md).

The starting point (``init``) is RTN (``V = 0, α = β = 1``) or GPTQ's solution
(``init=gptq``): before learning, GPTQ runs on the layer, true-sequentially (q/k/v, o,
gate/up, down, each stage's Hessian ``H = Σ XᵀX`` from the layer evaluated with the stages
before it already GPTQ-quantized, on ``gptq_windows`` windows), with static groups
(act-order) on the same group ranges; each weight is then rounded from ``W̃``, its rows as
GPTQ rounded them (after the error feedback), ``q = clamp(⌊W̃/s + V⌉ + z)``, so ``V = 0`` is
GPTQ's codes exactly and ``V`` can move each code by one step towards where ``W̃`` lies
(:mod:`qcompiler.quant.learned_round`).  The first ``samples`` windows train.  Around GPTQ the
range shrinks are best left alone (``learn_range=false``: a new scale moves every code of the
group off GPTQ's solution) and the step kept small (``lr=0.005``): on SmolLM2's layer 15 the
held-window layer loss goes RTN 0.180, learned from RTN 0.069, GPTQ 0.0463, GPTQ + V-only
0.0448, GPTQ + V, α, β at ``lr=0.02`` 0.078 (worse than its start, so the start is kept).

The optimiser is signed gradient descent (SignSGD, AutoRound): ``θ ← Π(θ − η_t·sign(∇θ))``
on minibatches of ``batch`` calibration windows, ``η_t = lr·(1 − t/iters)`` (linear decay;
``lr=0`` means ``1/iters``, AutoRound's default), ``Π`` the projection onto the boxes; the
gradient of ``⌊·⌉`` is straight-through.  After ``iters`` steps the layer's loss on
``eval_windows`` held windows is compared with the starting point's (RTN's or GPTQ's) and the
better of the two is kept (the reconstruction error is never worse than the start's on those
windows).

``f_i`` is evaluated in torch by a small ONNX interpreter (:mod:`qcompiler.onnx_torch`) on the
layer's subgraph (:meth:`qcompiler.layerwise.LayerwiseRunner.layer_graph`), one layer at a
time: memory is one layer's weights, their parameters (3 floats per weight), and the
residual stream of ``samples`` windows (twice with ``target=float``).  The quantized layer is
then written in the portable form ``MatMul(X, DequantizeLinear(q, s, z))`` (the same as
RTN/GPTQ, so the MatMulNBits lowering is unchanged) and ONNX Runtime advances the quantized
stream.  torch uses ``threads`` threads.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
from qcompiler.passes.gptq import STAGES
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig, quantizable_linears
from tqdm import tqdm

from qcompiler.errors import QCError
from qcompiler.irutil import QUANT_OPSET, ensure_opset, linear_weight
from qcompiler.layerwise import LayerwiseRunner
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import emit_dequantized_weight, stored_spec
from qcompiler.quant.numerics import quantize_weight
from qcompiler.spec import QuantSpec, linear_info, weight_spec

if TYPE_CHECKING:  # torch is imported when the pass runs, not when passes are discovered
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundConfig:
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    sym: bool = False
    iters: int = 50  # signed-gradient steps per decoder layer (AutoRound-light: 50; 200 for its default)
    lr: float = 0.0  # initial step (linearly decayed to 0); 0 = 1/iters
    samples: int = 32  # calibration windows used (the first ones)
    tokens: int = 128  # tokens of each window used (its first ones; 0 = all)
    batch: int = 1  # windows per step
    eval_windows: int = 4  # windows on which the result is compared with RTN's
    min_clip: float = 0.5  # α, β ∈ [min_clip, 1]
    target: str = "same"  # same: float layer on the quantized input | float: float layer on the float stream
    threads: int = 1  # torch intra-op threads: on a busy 2-core machine one is 5× faster than two
    seed: int = 0
    skip: str = ""  # ':'-separated linear keys to leave in float
    init: str = "rtn"  # rtn | gptq: the starting point of the offsets
    gptq_windows: int = 128  # init=gptq: windows whose Hessians GPTQ uses (the first `samples` of them train)
    damp: float = 0.01  # init=gptq: GPTQ's damping
    act_order: bool = True  # init=gptq: GPTQ's act-order (static groups)
    learn_range: bool = True  # learn α, β too (false: the offsets V alone, on the starting grid)

    def __post_init__(self) -> None:
        QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size)  # same checks
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if self.samples < 1 or self.batch < 1 or self.eval_windows < 1 or self.threads < 1:
            raise ValueError("samples, batch, eval_windows and threads must be positive")
        if not 0 < self.min_clip <= 1:
            raise ValueError(f"min_clip must be in (0, 1], got {self.min_clip}")
        if self.target not in ("float", "same"):
            raise ValueError(f"target must be float or same, got {self.target}")
        if self.init not in ("rtn", "gptq"):
            raise ValueError(f"init must be rtn or gptq, got {self.init}")
        if self.gptq_windows < 1 or not 0 < self.damp < 1:
            raise ValueError("gptq_windows must be positive and damp in (0, 1)")

    def spec(self) -> QuantSpec:
        qw = QuantizeWeightsConfig(bits=self.bits, group_size=self.group_size, sym=self.sym)
        return dataclasses.replace(qw.spec(), method="round")


@register_pass
class Round(QCPass):
    """Learned rounding per decoder layer on calibration data (see module docstring)."""

    name = "round"
    Config = RoundConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import torch

        from qcompiler.onnx_torch import to_torch

        cfg: RoundConfig = self.config
        calibrator = self.context.require_calibration(self.name)
        nodes = quantizable_linears(model, False, frozenset(filter(None, cfg.skip.split(":"))))
        windows = max(cfg.samples, cfg.gptq_windows) if cfg.init == "gptq" else cfg.samples
        runner = LayerwiseRunner.from_calibrator(model, calibrator, max_windows=windows,
                                                 max_tokens=cfg.tokens or None)
        wanted = {id(n) for n in nodes}
        report: dict[str, Any] = {}
        ensure_opset(model, "", QUANT_OPSET)
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        runner.start()
        float_stream: list[torch.Tensor] | None = None
        try:
            for layer in tqdm(runner.layers, desc="round", unit="layer", disable=not runner.progress):
                members = [n for n in layer.linears.values() if id(n) in wanted]
                if cfg.target == "float" and float_stream is None:
                    float_stream = [to_torch(runner.hidden[w]) for w in range(min(cfg.samples, runner.num_windows))]
                result = self._layer(model, runner, layer, members, float_stream)
                if result is not None:
                    report[f"layers.{layer.index}"] = result
                runner.advance()
        finally:
            torch.set_num_threads(threads)
            runner.close()
        self.context.report["round"] = {
            "calibration_windows": runner.num_windows, "iters": cfg.iters, "target": cfg.target, "init": cfg.init,
            "layers": report,
            "mean_loss_ratio_vs_rtn": float(np.mean([r["loss"] / max(r["loss_rtn"], 1e-30) for r in report.values()]))
            if report else None,
        }
        log.info("round: %d layers; mean layer-output loss %.3g× RTN's", len(report),
                 self.context.report["round"]["mean_loss_ratio_vs_rtn"] or float("nan"))
        return ir.passes.PassResult(model, modified=bool(report))

    def _layer(self, model: ir.Model, runner: LayerwiseRunner, layer: Any, members: list[ir.Node],
               float_stream: list[torch.Tensor] | None) -> dict[str, Any] | None:
        import torch

        from qcompiler.onnx_torch import TorchGraph, to_torch
        from qcompiler.quant.learned_round import LearnedRounding

        cfg: RoundConfig = self.config
        out_name, in_name = layer.output.name, layer.input.name
        proto, inputs = runner.layer_graph(layer.index, [out_name])
        graph = TorchGraph.from_model(proto, model)
        default = cfg.spec()
        weights: dict[str, tuple[np.ndarray, QuantSpec]] = {}
        for node in members:
            w_val, transposed = linear_weight(node)  # type: ignore[misc]
            if transposed or w_val.name not in graph.constants:
                raise QCError(f"round: {linear_info(node).key}: its weight is not a float initializer of the layer")
            weights[w_val.name] = (graph.constants[w_val.name].numpy(),
                                   stored_spec(weight_spec(node) or default, model.graph, node))
        n = runner.num_windows
        n_train = min(cfg.samples, n)
        hidden, static = [], []  # per window: the layer's input, and what the mask/rotary nodes compute from the rest
        for w in range(n):
            feeds = {k: to_torch(v) for k, v in runner.layer_feeds(layer.index, w, inputs).items()}
            static.append(graph.fold(feeds, {in_name, *weights}))
            hidden.append(feeds[in_name])
        with torch.no_grad():  # targets: the float layer
            if float_stream is not None:
                targets = [graph({in_name: float_stream[w]}, static=static[w])[0] for w in range(n_train)]
                float_stream[:] = targets  # the float model's next stream
            else:
                targets = [graph({in_name: hidden[w]}, static=static[w])[0] for w in range(n_train)]
        if not weights:  # every linear of the layer skipped: the float stream has moved on, nothing to learn
            return None
        starts = self._gptq_starts(graph, in_name, hidden, static, members, weights) if cfg.init == "gptq" else {}
        rounders = {name: LearnedRounding(w, spec, cfg.min_clip, start=starts.get(name))
                    for name, (w, spec) in weights.items()}

        def loss(windows: list[int], over: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            over = over or {name: r.fake() for name, r in rounders.items()}
            return sum((torch.mean((graph({in_name: hidden[w]}, over, static=static[w])[0] - targets[w]) ** 2) for w in windows), torch.zeros(())) / len(windows)

        held = list(range(min(cfg.eval_windows, n_train)))
        with torch.no_grad():
            loss_init = float(loss(held))
            loss_rtn = loss_init if cfg.init == "rtn" else float(loss(held, {
                name: torch.from_numpy(quantize_weight(w, spec).dequantize()) for name, (w, spec) in weights.items()}))
        rng = np.random.default_rng(cfg.seed + layer.index)
        lr = cfg.lr or 1.0 / max(cfg.iters, 1)
        order: list[int] = []
        first = last = float("nan")
        for t in range(cfg.iters):
            if len(order) < cfg.batch:
                order += list(rng.permutation(n_train))
            batch, order = order[: cfg.batch], order[cfg.batch :]
            value = loss(batch)
            value.backward()
            for r in rounders.values():
                r.step(lr * (1.0 - t / cfg.iters), cfg.learn_range)
            first = value.item() if t == 0 else first
            last = value.item()
        with torch.no_grad():
            loss_round = float(loss(held)) if cfg.iters else loss_init
        kept = loss_round <= loss_init
        if not kept:
            log.info("round: layer %d: learned rounding (%.4g) worse than its start (%s, %.4g) on the held windows; "
                     "start kept", layer.index, loss_round, cfg.init, loss_init)
            for r in rounders.values():
                r.reset()
        specs: dict[str, str] = {}
        for node in members:
            info = linear_info(node)
            qw = rounders[linear_weight(node)[0].name].quantized()  # type: ignore[index]
            emit_dequantized_weight(model.graph, node, qw, base_name=f"{info.key}.weight")
            specs[info.key] = qw.spec.describe()
        self.context.report.setdefault("weights", {}).update(specs)
        return {"loss_rtn": loss_rtn, "loss_init": loss_init, "loss": min(loss_round, loss_init), "learned_kept": kept,
                "first_step_loss": first, "last_step_loss": last}

    def _gptq_starts(self, graph: Any, in_name: str, hidden: list[torch.Tensor], static: list[dict[str, torch.Tensor]],
                     members: list[ir.Node], weights: dict[str, tuple[np.ndarray, QuantSpec]]) -> dict[str, np.ndarray]:
        """GPTQ on the layer, true-sequentially, in torch: the rows each weight was rounded from (``W̃``)."""
        import torch

        from qcompiler.quant.gptq import gptq_with_start

        cfg: RoundConfig = self.config
        fixed: dict[str, torch.Tensor] = {}  # weights of the stages done: GPTQ's Ŵ
        starts: dict[str, np.ndarray] = {}
        for roles in STAGES:
            stage = [n for n in members if linear_info(n).role in roles]
            if not stage:
                continue
            xs = sorted({n.inputs[0].name for n in stage})
            hess: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for w in range(len(hidden)):
                    for x, a in zip(xs, graph({in_name: hidden[w]}, fixed, outputs=xs, static=static[w])):
                        a = a.reshape(-1, a.shape[-1])
                        h = (a.T @ a).double()
                        hess[x] = hess[x] + h if x in hess else h
            for node in stage:
                name = linear_weight(node)[0].name  # type: ignore[index]
                w, spec = weights[name]
                try:
                    qw, starts[name] = gptq_with_start(w, hess[node.inputs[0].name].numpy(), spec,
                                                       act_order=cfg.act_order, damp=cfg.damp)
                except (ValueError, np.linalg.LinAlgError) as e:
                    raise QCError(f"round: gptq start of {linear_info(node).key}: {e}") from None
                fixed[name] = torch.from_numpy(qw.dequantize())
        return starts
