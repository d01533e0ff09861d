"""Check a GGUF file against its own header before transformers reads it.

A GGUF file is a header (magic ``GGUF``, version, tensor and key/value counts, the
key/value pairs, then one entry per tensor: name, dims, ggml type, offset into the data
section), padding to ``general.alignment`` (32 by default), and the tensor data.  A
truncated file otherwise fails deep inside the reader (``cannot reshape array of size
66784 into shape (576,360)``); here it is reported as truncated, with the size the
header's tensor table needs and the size the file has.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qcompiler.errors import InputError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class _Short(Exception):
    """The header itself ends early."""


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    tensors: int
    data_start: int
    expected_size: int  # data_start + the furthest tensor end
    last_tensor: str


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise _Short()
    return b


def _unpack(f: BinaryIO, fmt: str) -> int | float | bool:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> bytes:
    return _read(f, int(_unpack(f, "<Q")))


def _value(f: BinaryIO, vtype: int) -> object:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        item, count = int(_unpack(f, "<I")), int(_unpack(f, "<Q"))
        if item in _SCALARS:  # skip without decoding (token scores and types: ~50k items)
            _read(f, struct.calcsize(_SCALARS[item]) * count)
            return None
        for _ in range(count):
            _value(f, item)
        return None
    raise InputError(f"unknown GGUF value type {vtype}")


def _nbytes(ggml_type: int, dims: list[int]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise InputError(f"unknown ggml tensor type {ggml_type}") from None
    count = 1
    for d in dims:
        count *= d
    return count // block * size


def read_layout(path: str | os.PathLike) -> GGUFLayout:
    """Parse the header of the GGUF file ``path`` (no tensor data is read)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if _read(f, 4) != b"GGUF":
                raise InputError(f"{p} is not a GGUF file (bad magic bytes)")
            version = int(_unpack(f, "<I"))
            if version < 2:
                raise InputError(f"{p}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = int(_unpack(f, "<Q")), int(_unpack(f, "<Q"))
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = _string(f)
                value = _value(f, int(_unpack(f, "<I")))
                if key == b"general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            ends: list[tuple[int, str]] = []
            for _ in range(n_tensors):
                name = _string(f).decode("utf-8", "replace")
                dims = [int(_unpack(f, "<Q")) for _ in range(int(_unpack(f, "<I")))]
                ggml_type, offset = int(_unpack(f, "<I")), int(_unpack(f, "<Q"))
                ends.append((offset + _nbytes(ggml_type, dims), name))
            data_start = -(-f.tell() // alignment) * alignment
    except _Short:
        raise InputError(f"{p} is truncated: the file ends inside its GGUF header ({p.stat().st_size} bytes)") from None
    end, last = max(ends) if ends else (0, "")
    return GGUFLayout(version, n_tensors, data_start, data_start + end, last)


def check_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Refuse a GGUF file shorter than its header's tensor table says (a truncated download or copy)."""
    p = Path(path)
    layout = read_layout(p)
    size = p.stat().st_size
    if size < layout.expected_size:
        raise InputError(
            f"{p} is truncated: its header's tensor table needs {layout.expected_size} bytes "
            f"(tensor '{layout.last_tensor}' ends there), the file has {size}"
        )
    return layout
