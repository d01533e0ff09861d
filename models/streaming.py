"""Synthetic Llama model folders of any size, written weight by weight to external data.

:func:`build_model_dir_streaming` makes the same graph and the same weights as
``synthetic.build_model_dir`` (same seed → same numbers: the random generator is
called in the same order) but never holds the model: every tensor larger than
``inline_bytes`` is appended to ``model.onnx_data`` the moment it is created (offsets
aligned to 4 KiB so runtimes can map it) and only an external-data reference stays in
the graph.  Peak memory is about the largest weight (plus its float64 draw), so a
model past 2 GB — past protobuf's limit for a single message — is built on a small
budget.  The folder appears atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from qcompiler.models.synthetic import _G, GroundTruth, SyntheticConfig, build_llama, write_side_files

ALIGN = 4096
DATA_FILE = "model.onnx_data"


class _ExternalG(_G):
    """Graph builder that streams every large tensor to an open external-data file."""

    def __init__(self, data: BinaryIO, inline_bytes: int) -> None:
        super().__init__()
        self.data = data
        self.inline_bytes = inline_bytes
        self.bytes_written = 0

    def tensor(self, arr: np.ndarray, name: str) -> TensorProto:
        if arr.nbytes < self.inline_bytes:
            return numpy_helper.from_array(arr, name)
        offset = -(-self.data.tell() // ALIGN) * ALIGN
        self.data.seek(offset)
        self.data.write(np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).data)
        self.bytes_written += arr.nbytes
        t = TensorProto(name=name, dims=list(arr.shape), data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=key, value=value)
        return t


def model_bytes(cfg: SyntheticConfig) -> int:
    """Float32 bytes of the linear, embedding and norm weights of ``cfg`` (to size a model before building it)."""
    h, hd, inter, v = cfg.hidden, cfg.head_dim, cfg.intermediate, cfg.vocab
    per_layer = h * cfg.heads * hd + 2 * h * cfg.kv_heads * hd + cfg.heads * hd * h + 3 * h * inter + 2 * h
    head = 0 if cfg.tie_embeddings else h * v
    return 4 * (cfg.layers * per_layer + v * h + head + h)


def build_model_dir_streaming(
    out_dir: str | os.PathLike,
    cfg: SyntheticConfig | None = None,
    inline_bytes: int = 1024,
    force: bool = False,
) -> tuple[Path, GroundTruth]:
    """Build a synthetic model folder with every weight streamed to ``model.onnx_data``."""
    from qcompiler.artifact import atomic_output_dir

    cfg = cfg or SyntheticConfig()
    out = Path(out_dir)
    with atomic_output_dir(out, force=force) as tmp:
        with open(tmp / DATA_FILE, "wb") as data:
            g = _ExternalG(data, inline_bytes)
            model, truth = build_llama(cfg, builder=g)
        onnx.save_model(model, str(tmp / "model.onnx"))
        write_side_files(tmp, cfg)
    return out, truth
