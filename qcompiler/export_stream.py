"""Streaming export of a Llama-family safetensors checkpoint: the graph is written, never traced.

``qc export --stream`` builds the decoder graph directly in ONNX from ``config.json`` alone
(:mod:`qcompiler.decoder_graph`, the builder the synthetic test models share: optimum's op
pattern for Llama, with the math of one layer in its docstring), and copies every weight
straight from the safetensors shards into ``model.onnx_data``, one tensor at a time, in the
requested float type.  No model is ever held in torch or in memory.

A Hugging Face linear stores ``W[out, in]`` (``y = x·Wᵀ``); the graph's ``MatMul`` reads
``Wᵀ[in, out]``, so linear weights are transposed while copied.

**Memory.**  A tensor is read in blocks of ``R`` source rows (``R·in·bytes ≤ chunk``) with
``readinto`` into one reused buffer (no mmap, so no page of the checkpoint stays resident),
converted through fp32 and written with ``pwrite`` (a transposed block is ``in`` row
segments).  Resident: the block, its fp32 and target copies and the transposed copy,
at most ``(1 + 4/b_src + 2·b_dst/b_src)·chunk`` bytes (b = bytes per element;
bf16 → fp16: 5·chunk), plus the graph (a few MB) and the interpreter with numpy/onnx
(about 100 MiB): ``peak ≈ base + 5·chunk`` (:func:`stream_peak_bytes`), independent of
the model's size.

Supported: ``model_type`` llama, mistral, qwen2 (``q/k/v/o`` and MLP biases wherever the
checkpoint has them; ``rope_scaling`` default, linear or llama3; tied or untied head).
Anything else — another family, an active sliding window, another rope scaling — is
refused with a message pointing to the normal (optimum) export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from qcompiler.decoder_graph import GraphBuilder, LlamaShape, build_decoder
from qcompiler.errors import InputError, QCError, UnsupportedModelError
from qcompiler.floattype import DTYPE_NAMES, bf16_bits
from qcompiler.shapes import record_shapes_proto

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
DATA_FILE = "model.onnx_data"
ALIGN = 4096
#: Source bytes read per block (default): bounds the copy's temporaries (about 5× this).
DEFAULT_CHUNK = 32 << 20
#: The interpreter, numpy, onnx and qcompiler's own modules, measured (MiB).
BASE_MB = 120
_ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
#: --dtype name → (ONNX element type, bytes per element), from floattype's one table of spellings
TARGET_DTYPES = {name: (int(t), int(t.itemsize)) for name, t in DTYPE_NAMES.items()}
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "chat_template.json")
_NORMAL_EXPORT = "use the normal export (qc export without --stream), which loads the model with transformers"


# ---------------------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class SafeTensor:
    """One tensor of a safetensors file: ``nbytes`` bytes at absolute ``offset`` of ``file``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_safetensors_index(folder: str | os.PathLike) -> dict[str, SafeTensor]:
    """Every tensor of the folder's ``*.safetensors`` shards, from their headers only."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # the shards transformers reads (not e.g. Mistral's consolidated.safetensors beside them)
        try:
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index} is not a safetensors index: {e}") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index} names shard(s) that are missing: {', '.join(missing[:3])}")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no .safetensors file; {_NORMAL_EXPORT}")
    out: dict[str, SafeTensor] = {}
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{f} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise InputError(f"{f} is not a safetensors file (header length {n})")
            try:
                header = json.loads(fh.read(n))
            except ValueError as e:
                raise InputError(f"{f}: malformed safetensors header: {e}") from None
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if base + end > size or end < begin:
                raise InputError(f"{f}: tensor '{name}' lies past the end of the file (truncated?)")
            if meta["dtype"] not in _ST_DTYPES:
                raise UnsupportedModelError(f"{f}: tensor '{name}' has dtype {meta['dtype']}; "
                                            f"the streaming export reads F32/F16/BF16 only; {_NORMAL_EXPORT}")
            out[name] = SafeTensor(name, f, meta["dtype"], tuple(meta["shape"]), base + begin, end - begin)
    return out


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor viewed as ``[rows, cols]`` (rows = its first axis; a vector is one row)."""
    if len(shape) >= 2:
        return shape[0], int(np.prod(shape[1:]))
    return 1, int(np.prod(shape))


def _to_f32(raw: np.ndarray, src: str) -> np.ndarray:
    if src == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def _from_f32(x: np.ndarray, dst: int) -> np.ndarray:
    """fp32 → the target's storage (bf16 as uint16 bits, round to nearest even)."""
    if dst == TensorProto.FLOAT:
        return x
    if dst == TensorProto.FLOAT16:
        with np.errstate(over="ignore"):
            y = x.astype(np.float16)
        if not np.isfinite(y).all() and np.isfinite(x).all():
            raise InputError("a weight exceeds the fp16 range (|w| > 65504); export with --dtype bf16 or fp32")
        return y
    return bf16_bits(x)


def _convert(raw: np.ndarray, src: str, dst: int) -> np.ndarray:
    if (src, dst) in (("BF16", TensorProto.BFLOAT16), ("F16", TensorProto.FLOAT16), ("F32", TensorProto.FLOAT)):
        return raw
    return _from_f32(_to_f32(raw, src), dst)


class TensorWriter:
    """Appends tensors to ``model.onnx_data`` block by block (see the module docstring)."""

    def __init__(self, path: Path, dst: int, chunk: int = DEFAULT_CHUNK) -> None:
        self.path = path
        self.dst = dst
        self.dst_bytes = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2}[dst]
        self.chunk = max(int(chunk), 1 << 16)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.end = 0
        self._buf = bytearray(0)

    def close(self) -> None:
        os.close(self.fd)

    def _rows(self, t: SafeTensor) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` of the source tensor viewed as ``[rows, cols]``, in the target type."""
        rows, cols = _rows_cols(t.shape)
        npdt, isz = _ST_DTYPES[t.dtype]
        step = max(1, self.chunk // max(1, cols * isz))
        with open(t.file, "rb", buffering=0) as fh:
            fh.seek(t.offset)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0) * cols * isz
                if len(self._buf) < n:
                    self._buf = bytearray(n)
                view = memoryview(self._buf)[:n]
                got = 0
                while got < n:
                    k = fh.readinto(view[got:])
                    if not k:
                        raise InputError(f"{t.file}: tensor '{t.name}' is truncated")
                    got += k
                raw = np.frombuffer(self._buf, dtype=npdt, count=n // isz).reshape(-1, cols)
                yield r0, _convert(raw, t.dtype, self.dst)

    def write(self, t: SafeTensor, name: str, transpose: bool = False) -> TensorProto:
        """Copy ``t`` (transposed for a linear) to the data file; return its external reference."""
        if transpose and len(t.shape) != 2:
            raise UnsupportedModelError(f"'{t.name}' has shape {list(t.shape)}, expected a 2-D linear weight")
        rows, cols = _rows_cols(t.shape)
        offset = -(-self.end // ALIGN) * ALIGN
        nbytes = rows * cols * self.dst_bytes
        for r0, block in self._rows(t):
            if not transpose:
                os.pwrite(self.fd, np.ascontiguousarray(block).data, offset + r0 * cols * self.dst_bytes)
                continue
            tile = np.ascontiguousarray(block.T)  # [cols, r]: output rows cols, output columns r0:r0+r
            r = tile.shape[1]
            if r == rows:
                os.pwrite(self.fd, tile.data, offset)
                continue
            stride = rows * self.dst_bytes
            for i in range(cols):
                os.pwrite(self.fd, tile[i].data, offset + i * stride + r0 * self.dst_bytes)
            del tile
        self.end = offset + nbytes
        dims = [cols, rows] if transpose else list(t.shape)
        ref = TensorProto(name=name, dims=dims, data_type=self.dst)
        ref.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(nbytes))):
            ref.external_data.add(key=key, value=value)
        return ref


def stream_peak_bytes(chunk: int = DEFAULT_CHUNK, src_bytes: int = 2, dst_bytes: int = 2) -> int:
    """Upper bound of the streaming export's resident memory (see the module docstring)."""
    per_chunk = 1 + 4 / src_bytes + 2 * dst_bytes / src_bytes
    return int(BASE_MB * 2**20 + per_chunk * chunk)


def chunk_for_budget(max_bytes: int, src_bytes: int = 2, dst_bytes: int = 2) -> int:
    """The largest block size whose :func:`stream_peak_bytes` fits ``max_bytes`` (error if none does)."""
    per_chunk = 1 + 4 / src_bytes + 2 * dst_bytes / src_bytes
    chunk = int((max_bytes - BASE_MB * 2**20) / per_chunk)
    if chunk < (1 << 20):
        need = stream_peak_bytes(1 << 20, src_bytes, dst_bytes)
        raise QCError(f"--max-memory {max_bytes / 2**20:.0f} MiB is below the streaming export's minimum "
                      f"({need / 2**20:.0f} MiB: the interpreter plus 1 MiB blocks)")
    return min(chunk, 256 << 20)


# ---------------------------------------------------------------------------------------- config


def _inv_freq(cfg: dict, head_dim: int) -> np.ndarray:
    theta = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":  # transformers' _compute_llama3_parameters
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    raise UnsupportedModelError(f"rope_scaling type '{kind}' is not supported by the streaming export; {_NORMAL_EXPORT}")


def read_shape(folder: str | os.PathLike) -> LlamaShape:
    """Read and check ``config.json``: a Llama-family decoder the streaming export can write."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not readable JSON: {e}") from None
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"the streaming export writes {', '.join(SUPPORTED_FAMILIES)} models, not "
                                    f"'{mt}'; {_NORMAL_EXPORT}")
    if cfg.get("auto_map"):
        raise UnsupportedModelError(f"{Path(folder)} ships its own model code (auto_map); {_NORMAL_EXPORT}")
    sliding = cfg.get("sliding_window")
    if sliding and (mt == "mistral" or cfg.get("use_sliding_window")):
        raise UnsupportedModelError(f"sliding-window attention (sliding_window={sliding}) is not written by the "
                                    f"streaming export; {_NORMAL_EXPORT}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act '{act}' is not supported by the streaming export; {_NORMAL_EXPORT}")
    h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    hd = int(cfg.get("head_dim") or h // nh)
    return LlamaShape(
        model_type=mt, layers=int(cfg["num_hidden_layers"]), hidden=h, heads=nh,
        kv_heads=int(cfg.get("num_key_value_heads") or nh), head_dim=hd,
        intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        eps=float(cfg.get("rms_norm_eps", 1e-6)), tie=bool(cfg.get("tie_word_embeddings", False)),
        inv_freq=tuple(float(v) for v in _inv_freq(cfg, hd)),
    )


# ---------------------------------------------------------------------------------------- graph


class _Graph(GraphBuilder):
    """The decoder graph (:mod:`qcompiler.decoder_graph`) with every weight copied from the checkpoint."""

    def __init__(self, T: int, tensors: dict[str, SafeTensor], writer: TensorWriter) -> None:
        super().__init__(T)
        self.tensors = tensors
        self.writer = writer
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str, transpose: bool = False) -> str:
        if name not in self.tensors:
            raise InputError(f"the checkpoint has no tensor '{name}' (not a {', '.join(SUPPORTED_FAMILIES)} "
                             f"checkpoint?); {_NORMAL_EXPORT}")
        self.used.add(name)
        self.inits.append(self.writer.write(self.tensors[name], name, transpose))
        return name


def build_graph(s: LlamaShape, g: _Graph, kv_cache: bool) -> onnx.ModelProto:
    """The decoder graph of ``s`` (weights streamed through ``g``)."""
    return build_decoder(s, g, kv_cache, producer="qcompiler.export_stream")


# ---------------------------------------------------------------------------------------- entry point


def export_streaming(
    folder: str | os.PathLike,
    tmp: Path,
    dtype: str = "fp32",
    kv_cache: bool = True,
    max_memory: int | None = None,
) -> dict:
    """Write ``model.onnx`` + ``model.onnx_data`` and the side files of ``folder`` into ``tmp``.

    ``tmp`` is the (temporary, atomic) output folder of :func:`qcompiler.export.export`.
    ``max_memory`` (bytes) sizes the copy's blocks (:func:`chunk_for_budget`).  Returns a
    summary for ``qcompiler_export.json``.
    """
    if dtype not in TARGET_DTYPES:
        raise QCError(f"dtype must be one of {', '.join(TARGET_DTYPES)}, got '{dtype}'")
    t0 = time.perf_counter()
    folder = Path(folder)
    shape = read_shape(folder)
    tensors = read_safetensors_index(folder)
    T, dst_bytes = TARGET_DTYPES[dtype]
    src_bytes = max(_ST_DTYPES[t.dtype][1] for t in tensors.values())
    chunk = chunk_for_budget(max_memory, src_bytes, dst_bytes) if max_memory else DEFAULT_CHUNK
    writer = TensorWriter(tmp / DATA_FILE, T, chunk)
    try:
        g = _Graph(T, tensors, writer)
        model = build_graph(shape, g, kv_cache)
    finally:
        writer.close()
    unused = sorted(set(tensors) - g.used - {"lm_head.weight"} - {n for n in tensors if n.endswith("rotary_emb.inv_freq")})
    if unused:
        raise UnsupportedModelError(f"the checkpoint holds tensors the streaming export does not write "
                                    f"({', '.join(unused[:4])}{' …' if len(unused) > 4 else ''}); {_NORMAL_EXPORT}")
    record_shapes_proto(model, tmp)  # saved as value_info: the passes that read shapes need no inference
    onnx.save_model(model, str(tmp / "model.onnx"))
    for name in _SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    log.info("streaming export: %d layers, %s, %.2f GB of weights in %.1fs (blocks of %d MiB)", shape.layers, dtype,
             writer.end / 1e9, time.perf_counter() - t0, chunk >> 20)
    return {"streamed": True, "dtype": dtype, "family": shape.model_type, "chunk_bytes": chunk,
            "peak_bound_bytes": stream_peak_bytes(chunk, src_bytes, dst_bytes)}
