"""Evaluation: perplexity, and against a float reference KL divergence and top-1 agreement.

On the same fixed windows (``data.make_windows``), for each position t that has a
next token:

* ``NLL = −log p(x_{t+1} | x_≤t)``, perplexity ``= exp(mean NLL)`` over all windows;
* ``KL(p_ref ‖ p) = Σ_v p_ref(v)·(log p_ref(v) − log p(v))``, averaged over positions
  (all positions, including the last of each window);
* top-1 agreement = fraction of positions where ``argmax p == argmax p_ref``.

Both models run window by window, so memory is one window of logits per model.

``through_cache=True`` computes each window as a deployment does (``DecoderRunner.logits_through_cache``):
the first half in one run from an empty cache, then the rest token by token through
``past_key_values``/``present``, so a quantized KV cache shows in the numbers (both models the same way).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from qcompiler.artifact import open_model_dir
from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.irutil import check_model_file
from qcompiler.runtime import DecoderRunner, open_runner

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 8192


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (max-shifted; ~4e-6 from float64 on a 49k vocabulary)."""
    z = logits.astype(np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def window_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """NLL of each next token in one window: ``[T-1]``."""
    lp = log_softmax(logits[:-1])
    return -lp[np.arange(len(ids) - 1), ids[1:]]


def kl_rows(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(ref_t) ‖ softmax(q_t))`` of every position t of logits ``[..., vocab]``, in nats
    (each summed in float64): ``[positions]``."""
    lp = log_softmax(ref_logits.reshape(-1, ref_logits.shape[-1]))
    lq = log_softmax(logits.reshape(-1, logits.shape[-1]))
    return (np.exp(lp) * (lp - lq)).sum(axis=-1, dtype=np.float64)


def kl_per_token(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean :func:`kl_rows` over every position."""
    return float(np.mean(kl_rows(ref_logits, logits)))


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """``exp(mean NLL)`` of the next tokens of windows ``ids[N, T]`` from their logits ``[N, T, vocab]``."""
    nll = np.concatenate([window_nll(logits[i], ids[i]) for i in range(len(ids))])
    return float(np.exp(nll.mean(dtype=np.float64)))


class LogitsSource(Protocol):
    """What :func:`evaluate_windows` reads from a model: logits ``[T, vocab]`` of one window
    (:class:`~qcompiler.runtime.DecoderRunner`, :class:`LogitsOf`, bench's cached reference)."""

    def logits(self, ids: np.ndarray) -> np.ndarray: ...


class LogitsOf:
    """A :class:`LogitsSource` from a function ``ids → logits [T, vocab]``: a session fed extra
    inputs, or logits computed once and kept (``LogitsOf(cache.__getitem__)``)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self._fn = fn

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self._fn(ids)


@dataclass
class EvalResult:
    model: str
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    seq_len: int
    seconds: float
    size_bytes: int
    reference: str | None = None
    reference_perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    through_cache: bool | None = None
    cache_bytes_per_token: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate(
    model_dir: str | os.PathLike,
    text_path: str | os.PathLike,
    reference_dir: str | os.PathLike | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    threads: int | None = None,
    progress: bool = True,
    optimize: bool = True,
    through_cache: bool = False,
) -> EvalResult:
    """Perplexity of ``model_dir`` on the text (and KL / top-1 against ``reference_dir``).

    ``optimize=False`` runs the graph as written (``ORT_DISABLE_ALL``: no fusion, a QDQ graph's
    reference semantics, what an NPU computes) instead of what ONNX Runtime's CPU provider fuses it into.
    """
    md = open_model_dir(model_dir)
    ref_md = open_model_dir(reference_dir) if reference_dir is not None else None
    for folder in filter(None, (md, ref_md)):  # the same checks as qc quantize, before ONNX Runtime reads it
        check_model_file(folder.model_path)
    tokens = tokenize(md.path, read_text(text_path))
    win = make_windows(tokens, seq_len, max_tokens)
    runner = open_runner(md.path, threads=threads, optimize=optimize)
    ref_runner = open_runner(ref_md.path, threads=threads) if ref_md is not None else None
    return evaluate_windows(runner, win.ids, ref_runner, str(md.path), str(ref_md.path) if ref_md else None,
                            size_bytes=md.size_bytes(), progress=progress, through_cache=through_cache)


def evaluate_windows(
    runner: DecoderRunner | LogitsSource,
    windows: np.ndarray,
    ref_runner: DecoderRunner | LogitsSource | None = None,
    name: str = "",
    ref_name: str | None = None,
    size_bytes: int = 0,
    progress: bool = True,
    through_cache: bool = False,
) -> EvalResult:
    """:func:`evaluate` on token ``windows`` ``[N, T]`` with models already open; ``through_cache``
    needs :class:`~qcompiler.runtime.DecoderRunner` models."""
    t0 = time.perf_counter()

    def logits_of(r: DecoderRunner | LogitsSource, ids: np.ndarray) -> np.ndarray:
        if through_cache:
            assert isinstance(r, DecoderRunner)
            return r.logits_through_cache(ids, len(ids) // 2)
        return r.logits(ids)

    nll_sum, count = 0.0, 0
    ref_nll_sum = 0.0
    kl_sum, agree, positions = 0.0, 0, 0
    for ids in tqdm(windows, desc=f"eval {Path(name).name}", unit="window", leave=False, disable=not progress):
        logits = logits_of(runner, ids)
        nll = window_nll(logits, ids)
        nll_sum += float(nll.sum(dtype=np.float64))
        count += len(nll)
        if ref_runner is not None:
            ref_logits = logits_of(ref_runner, ids)
            ref_nll_sum += float(window_nll(ref_logits, ids).sum(dtype=np.float64))
            kl_sum += float(kl_rows(ref_logits, logits).sum())
            agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
            positions += logits.shape[0]
    res = EvalResult(
        model=name,
        perplexity=float(np.exp(nll_sum / count)),
        nll=nll_sum / count,
        tokens_scored=count,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seconds=round(time.perf_counter() - t0, 2),
        size_bytes=size_bytes,
    )
    if through_cache:
        res.through_cache = True
        kv = getattr(runner, "kv", None)
        res.cache_bytes_per_token = kv.bytes_per_token if kv is not None else None
    if ref_runner is not None:
        res.reference = ref_name
        res.reference_perplexity = float(np.exp(ref_nll_sum / count))
        res.kl = kl_sum / positions
        res.top1_agreement = agree / positions
    return res
