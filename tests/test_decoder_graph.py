"""One decoder builder serves both: the synthetic model's weights, saved as a Hugging Face checkpoint
and exported by ``qc export --stream``, give the synthetic graph's logits and KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper
from qcompiler.models.synthetic import SyntheticConfig, build_llama, write_model_dir, write_side_files

from qcompiler.export_stream import export_streaming
from qcompiler.runtime import open_runner

IDS = np.array([3, 7, 100, 250, 9, 0, 44, 61, 128, 5], np.int64)


def _checkpoint(model, folder: Path, cfg: SyntheticConfig) -> Path:
    """The graph's weights under their Hugging Face names, linears stored ``W[out, in]``."""
    from safetensors.numpy import save_file

    tensors = {}
    for t in model.graph.initializer:
        name = t.name
        if name.startswith("/model/layers."):
            layer, rest = name[len("/model/layers."):].split("/", 1)
            name = f"model.layers.{layer}." + rest.replace("/", ".")
        elif name == "/model/norm.weight":
            name = "model.norm.weight"
        elif not (name.endswith(".weight") and "." in name):
            continue  # a constant of the graph
        a = numpy_helper.to_array(t)
        tensors[name] = np.ascontiguousarray(a.T if a.ndim == 2 and "embed_tokens" not in name else a)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    write_side_files(folder, cfg)
    return folder


@pytest.mark.parametrize("cfg", [SyntheticConfig(massive_dim=None),
                                 SyntheticConfig(massive_dim=None, tie_embeddings=True, kv_heads=4, layers=1)])
def test_stream_export_of_the_synthetic_weights_is_the_synthetic_graph(cfg: SyntheticConfig, tmp_path: Path) -> None:
    model, _ = build_llama(cfg)
    ref = open_runner(write_model_dir(model, tmp_path / "synthetic", cfg))
    out = tmp_path / "streamed"
    out.mkdir()
    export_streaming(_checkpoint(model, tmp_path / "ck", cfg), out, "fp32", kv_cache=True)
    got = open_runner(out)
    np.testing.assert_array_equal(got.logits(IDS), ref.logits(IDS))
    # and decoding through the cache: prefill 6 tokens, then one at a time
    np.testing.assert_array_equal(got.logits_through_cache(IDS, 6), ref.logits_through_cache(IDS, 6))
