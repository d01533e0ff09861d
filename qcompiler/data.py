"""Text for evaluation and calibration: reading files, tokenizing, cutting windows.

Text is the user's: a ``.txt`` file, a ``.jsonl`` file with a ``"text"`` field per line,
or a folder of ``.txt`` files (sorted by name).  It is tokenized with the model
folder's ``tokenizer.json`` (no special tokens added) and cut into fixed windows, so
two models evaluated on the same text see exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.errors import InputError, OptionError


def read_text(path: str | os.PathLike) -> str:
    """Read ``.txt``, ``.jsonl`` (``"text"`` fields) or a folder of ``.txt`` as one string."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such text file or folder: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise InputError(f"{p} holds no .txt files")
        text = "\n\n".join(_read_file(f) for f in files)
    else:
        text = _read_file(p)
    if not text.strip():
        raise InputError(f"{p} holds no text (empty or whitespace only)")
    return text


def _read_file(p: Path) -> str:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text (invalid byte at offset {e.start})") from None
    if p.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{i}: not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f'{p}:{i}: expected an object with a "text" string field')
            parts.append(obj["text"])
        return "\n\n".join(parts)
    return text


def load_tokenizer(model_dir: str | os.PathLike):
    from tokenizers import Tokenizer

    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise InputError(f"{model_dir} has no tokenizer.json (export it with 'qc export')")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed JSON
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p} is not a valid tokenizer.json: {first}") from None


def tokenize(model_dir: str | os.PathLike, text: str) -> np.ndarray:
    tok = load_tokenizer(model_dir)
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


@dataclass(frozen=True)
class Windows:
    """Fixed, non-overlapping token windows ``ids[i] = tokens[i·L:(i+1)·L]``."""

    ids: np.ndarray  # [n, L]

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def digest(self) -> str:
        return hashlib.sha256(self.ids.tobytes()).hexdigest()[:16]


def make_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> Windows:
    """Cut ``tokens`` (first ``max_tokens``) into windows of ``seq_len``; a short text makes one window."""
    if seq_len < 2:
        raise OptionError(f"--seq-len must be at least 2, got {seq_len}")
    t = tokens[:max_tokens] if max_tokens else tokens
    if len(t) < 2:
        raise InputError(f"the text has only {len(t)} token(s); at least 2 are needed")
    n = len(t) // seq_len
    if n == 0:
        return Windows(t[None, :].copy())
    return Windows(t[: n * seq_len].reshape(n, seq_len).copy())
