"""ONNX Runtime sessions over model folders: feeds for KV-cache graphs, logits, generation.

A decoder graph exported by optimum (or rewritten by qcompiler) takes ``input_ids``,
usually ``attention_mask`` and ``position_ids``, and with a KV cache
``past_key_values.{i}.key/value`` of shape ``[batch, kv_heads, past, head_dim]``,
returning ``logits`` and ``present.{i}.key/value``.  :class:`DecoderRunner` builds the
feeds for either form, so evaluation and generation work the same on both.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler import interrupt
from qcompiler.errors import InputError, QCError, UnsupportedModelError
from qcompiler.irutil import check_model_file

log = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def ort_message(e: BaseException) -> str:
    """ONNX Runtime's error text, first line, without its ``[ONNXRuntimeError] : 1 : FAIL :`` prefix."""
    lines = str(e).strip().splitlines()
    return _ORT_PREFIX.sub("", lines[0]) if lines else type(e).__name__


def session_options(threads: int | None = None, optimize: bool = True, spin: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spin:  # idle intra-op threads sleep instead of busy-waiting (fairer on a shared machine)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # Keep block-quantized DequantizeLinear+MatMul in float when ORT fuses it into MatMulNBits,
    # so the portable (QDQ) form evaluates to the same numbers as the MatMulNBits form.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


class Session(ort.InferenceSession):
    """An ``InferenceSession`` whose runs stop within one node's time on Ctrl-C or SIGTERM.

    Every :meth:`run` registers its ``RunOptions`` with :mod:`qcompiler.interrupt`, whose watcher
    sets ``terminate`` on it when such a signal arrives; the run then raises the signal's
    exception (``KeyboardInterrupt``) instead of finishing the window.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        interrupt.install()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def run(self, output_names: list[str] | None, input_feed: dict[str, object],
            run_options: ort.RunOptions | None = None) -> list[object]:
        run = ort.InferenceSession.run
        return interrupt.call(lambda opts: run(self, output_names, input_feed, opts), run_options)


def proto_session(proto: onnx.ModelProto, so: ort.SessionOptions,
                  folder: str | os.PathLike | None = None) -> ort.InferenceSession:
    """A CPU session over an in-memory graph whose external data lies in ``folder``.

    Registers qcompiler's op library when the graph uses its domain, and widens a bf16 graph
    to compute in float32 in place (ORT has no bf16 MatMul on CPU).  ONNX Runtime's own
    exceptions propagate: the caller says what could not run.
    """
    from qcompiler.floattype import widen_bf16

    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    if any(o.domain == "qcompiler" for o in proto.opset_import):
        from qcompiler.ops import register_library  # raises a QCError naming the build command

        register_library(so)
    widen_bf16(proto)
    return Session(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def custom_op_library() -> str | None:
    """Path of qcompiler's custom-op library if the model needs it and it is built."""
    try:
        from qcompiler.ops import library_path  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return str(library_path())
    except QCError as e:  # not built: the caller decides whether the model needs it
        log.debug("custom-op library unavailable: %s", e)
        return None


def make_session(
    model_path: str | os.PathLike,
    threads: int | None = None,
    optimize: bool = True,
    providers: list[str] | None = None,
    spin: bool = True,
) -> ort.InferenceSession:
    """An ORT session; registers qcompiler's op library when the model uses domain ``qcompiler``."""
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise InputError(f"no model at {path}")
    check_model_file(path)  # the same checks and messages as every other command, before ORT's own
    so = session_options(threads, optimize, spin)
    if _uses_qc_domain(path):
        from qcompiler.ops import register_library  # raises a QCError naming the build command

        register_library(so)
    try:
        return Session(str(path), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise InputError(f"ONNX Runtime cannot load {path}: {ort_message(e)}") from None


def _uses_qc_domain(path: Path) -> bool:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(o.domain == "qcompiler" for o in proto.opset_import)


_CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
                "tensor(uint8)": np.uint8}


def cache_dtype(ort_type: str) -> np.dtype:
    """numpy dtype of a KV-cache input's ONNX Runtime type: float32/16, int8, or uint8 (int4 two per byte)."""
    if ort_type not in _CACHE_TYPES:
        raise UnsupportedModelError(f"KV-cache input of type {ort_type}: not a cache type qcompiler feeds "
                                    f"({', '.join(_CACHE_TYPES)})")
    return np.dtype(_CACHE_TYPES[ort_type])


@dataclass(frozen=True)
class KVSpec:
    """The cache's shape per layer and tensor: ``[batch, kv_heads, tokens, head_dim]`` of ``dtype`` (an int4
    cache stores ``head_dim`` = half the head size, two values per uint8)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes the cache grows by per token (keys and values of every layer, batch 1)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


class DecoderRunner:
    """Runs a decoder graph on token windows, with or without a KV cache."""

    def __init__(self, session: ort.InferenceSession, require_logits: bool = True) -> None:
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        if "input_ids" not in self.inputs:
            raise UnsupportedModelError("the model has no 'input_ids' input: not a decoder exported by optimum/qcompiler")
        if require_logits and "logits" not in self.output_names:
            raise UnsupportedModelError("the model has no 'logits' output")
        self.past_names = sorted(
            (n for n in self.inputs if _PAST.match(n)), key=lambda n: (int(_PAST.match(n).group(1)), n)  # type: ignore[union-attr]
        )
        self.kv: KVSpec | None = None
        if self.past_names:
            shape = self.inputs[self.past_names[0]].shape
            heads, head_dim = shape[1], shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                raise UnsupportedModelError(f"cannot read KV-cache shape from input {self.past_names[0]}: {shape}")
            self.kv = KVSpec(len(self.past_names) // 2, heads, head_dim, cache_dtype(self.inputs[self.past_names[0]].type))
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]

    @property
    def has_kv_cache(self) -> bool:
        return self.kv is not None

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        if self.kv is None:
            return {}
        z = np.zeros((batch, self.kv.kv_heads, 0, self.kv.head_dim), dtype=self.kv.dtype)
        return {n: z for n in self.past_names}

    def feeds(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, past_len: int = 0) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        b, t = ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((b, past_len + t), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
        if self.kv is not None:
            feeds.update(past if past is not None else self.empty_past(b))
        for name in self.inputs:
            if name not in feeds:
                if name == "use_cache_branch":
                    feeds[name] = np.array([past_len > 0])
                else:
                    raise UnsupportedModelError(f"don't know how to feed model input '{name}'")
        return feeds

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``[T, vocab]`` (float32) of one window, from an empty cache."""
        out = self.session.run(["logits"], self.feeds(ids))[0]
        return np.asarray(out[0], dtype=np.float32)

    def logits_through_cache(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        """Logits ``[T, vocab]`` of one window computed as a deployment does: the first ``prefill`` tokens in
        one run from an empty cache, then each further token alone, reading the cache the previous run
        wrote (``present.*`` → ``past_key_values.*``), so a quantized cache's rounding reaches every later
        token through the stored keys and values."""
        if self.kv is None:
            raise UnsupportedModelError("the model has no KV cache: scoring through the cache needs one "
                                        "(export without --no-kv-cache)")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        prefill = max(1, min(int(prefill), len(ids)))
        outs = self.session.run(["logits", *self.present_names], self.feeds(ids[:prefill]))
        rows = [np.asarray(outs[0][0], dtype=np.float32)]
        past = dict(zip(self.past_names, outs[1:]))
        for t in range(prefill, len(ids)):
            outs = self.session.run(["logits", *self.present_names], self.feeds(ids[t:t + 1], past, t))
            rows.append(np.asarray(outs[0][0], dtype=np.float32))
            past = dict(zip(self.past_names, outs[1:]))
        return np.concatenate(rows, axis=0)

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> Iterator[int]:
        """Yield new tokens (greedy when ``temperature == 0``), using the KV cache if present."""
        rng = np.random.default_rng(seed)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        tokens = list(prompt)
        if self.kv is None:
            for _ in range(max_new_tokens):
                nxt = _pick(self.logits(np.array(tokens))[-1], temperature, top_k, rng)
                tokens.append(nxt)
                yield nxt
                if nxt in eos:
                    return
            return
        past = self.empty_past()
        step_ids = np.array(tokens, dtype=np.int64)
        past_len = 0
        for _ in range(max_new_tokens):
            outs = self.session.run(["logits", *self.present_names], self.feeds(step_ids, past, past_len))
            past_len += step_ids.shape[-1]
            past = dict(zip(self.past_names, outs[1:]))
            nxt = _pick(np.asarray(outs[0][0, -1], dtype=np.float32), temperature, top_k, rng)
            yield nxt
            if nxt in eos:
                return
            step_ids = np.array([nxt], dtype=np.int64)


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def open_runner(
    model_dir: str | os.PathLike, threads: int | None = None, optimize: bool = True, spin: bool = True
) -> DecoderRunner:
    return DecoderRunner(make_session(model_dir, threads=threads, optimize=optimize, spin=spin))
