"""Helpers for the fuse-* pass tests: run a pipeline, compare logits and greedy tokens through ORT."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from qcompiler.models.synthetic import SyntheticConfig, build_llama

from qcompiler.irutil import load_model, op_types, save_model
from qcompiler.pipeline import _REGISTRY, QCPass, make_config, run_passes, split_pipeline
from qcompiler.runtime import DecoderRunner, make_session

#: the cpu target's fusions (fuse-rules: rmsnorm, skip-rmsnorm and silu in one sweep)
ALL_FUSIONS = "fuse-rules,fuse-rotary,fuse-attention,fuse-pack-linears"
#: the same fusions with each rule group as its own pass, in the order they ran before fuse-rules
SEPARATE_FUSIONS = "fuse-rmsnorm,fuse-skip-rmsnorm,fuse-rotary,fuse-attention,fuse-pack-linears,fuse-silu"


def synthetic(cfg: SyntheticConfig | None = None,
              edit: Callable[[onnx.ModelProto], None] | None = None) -> ir.Model:
    proto, _ = build_llama(cfg or SyntheticConfig())
    if edit is not None:
        edit(proto)
    return ir.serde.deserialize_model(proto)


def passes(pipeline: str) -> list[QCPass]:
    """The pipeline's passes, importing only their own modules (``fuse-rotary`` → ``passes/fuse_rotary.py``)."""
    out = []
    for name, opts in split_pipeline(pipeline):
        importlib.import_module(f"qcompiler.passes.{name.replace('-', '_')}")
        cls = _REGISTRY[name]
        out.append(cls(make_config(cls, opts)))
    return out


def run(model: ir.Model | Path, pipeline: str) -> ir.Model:
    if isinstance(model, Path):
        model = load_model(model / "model.onnx" if model.is_dir() else model)
    model, _ = run_passes(model, passes(pipeline))
    return model


def runner(model: ir.Model | Path, tmp: Path, threads: int = 1) -> DecoderRunner:
    if isinstance(model, ir.Model):
        tmp.mkdir(parents=True, exist_ok=True)
        save_model(model, tmp / "model.onnx")
        model = tmp
    return DecoderRunner(make_session(model, threads=threads))


def rel_err(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.abs(ref - test).max() / max(np.abs(ref).max(), 1e-30))


def assert_same_decoder(ref: DecoderRunner, test: DecoderRunner, ids: np.ndarray, steps: int = 0,
                        tol: float = 1e-4) -> None:
    """Logits within ``tol`` (relative to the largest logit); ``steps`` greedy tokens identical."""
    err = rel_err(ref.logits(ids), test.logits(ids))
    assert err < tol, f"logits differ by {err:.2e} (relative)"
    if steps:
        prompt = [int(t) for t in ids[:8]]
        a, b = list(ref.generate(prompt, steps)), list(test.generate(prompt, steps))
        assert a == b, f"greedy tokens differ: {a} vs {b}"


def count(model: ir.Model, op: str) -> int:
    return op_types(model).get(op, 0)


def node_by_name(proto: onnx.ModelProto, suffix: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name.endswith(suffix) or suffix in n.name)


def set_const(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace the initializer ``name``."""
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            proto.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def add_const(proto: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    proto.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return name


WINDOW = (np.arange(40) * 37 + 11) % 256


def graph_nodes(model: ir.Model) -> list[tuple]:
    """Every node as (domain, op, input names, output names, attributes), in graph order; node names left out and
    onnxscript's generated value names (``val_N``) renumbered in graph order: it numbers what it makes in the order
    it makes it."""
    auto: dict[str, str] = {}

    def name(v: ir.Value | None) -> str:
        if v is None or not v.name:
            return ""
        return auto.setdefault(v.name, f"val#{len(auto)}") if v.name.startswith("val_") else v.name

    def value(a: ir.Attr) -> object:  # a tensor attribute by its contents (its name is the Constant's value's)
        return a.value.numpy().tobytes() if isinstance(a.value, ir.TensorProtocol) else repr(a.value)

    return [(n.domain, n.op_type, [name(v) for v in n.inputs], [name(v) for v in n.outputs],
             sorted((k, value(a)) for k, a in n.attributes.items())) for n in model.graph]
