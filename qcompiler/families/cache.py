"""Tiny family models exported once per machine, shared by the tests and ``tools/family_table.py``.

The folder is keyed by qcompiler's export code, the tiny configs and the transformers
version, and built behind a file lock so parallel runs share one export::

    ROOT/family-<model_type>-<key>/hf     the seeded random transformers model (build_tiny)
    ROOT/family-<model_type>-<key>/onnx   its export
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """``$QC_TEST_CACHE``, default ``~/.cache/qcompiler/tests`` (created)."""
    root = Path(os.environ.get("QC_TEST_CACHE", Path.home() / ".cache" / "qcompiler" / "tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def tiny_export(model_type: str, root: Path | None = None) -> Path:
    """The cached tiny ``model_type`` export's base folder (``hf/`` and ``onnx/`` inside), built if missing.

    ``model_type`` may also name a variant (:data:`qcompiler.families.tiny.TINY_VARIANTS`)."""
    import transformers

    import qcompiler.export as exp
    import qcompiler.families.tiny as tiny
    import qcompiler.shapes as shapes

    root = root or cache_root()
    h = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (exp, tiny, shapes)))
    h.update(transformers.__version__.encode())
    base = root / f"family-{model_type}-{h.hexdigest()[:12]}"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "onnx" / "model.onnx").is_file():
            tiny.build_tiny(model_type, base / "hf")
            exp.export(str(base / "hf"), base / "onnx", force=True)
    return base
