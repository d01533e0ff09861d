"""Model folders and atomic output.

A *model folder* is what ``qc export`` writes and every other command reads:
``model.onnx`` + ``model.onnx_data`` (weights), the tokenizer files, ``config.json``,
and after ``qc quantize`` a ``quantization.json``.  Output folders are always built
in a temporary sibling folder and renamed into place at the end, so an interrupted
or failing command never leaves a half-written model where the user asked for one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompiler import __version__
from qcompiler.errors import InputError, OutputError, QCError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
#: Files copied along with the model (tokenizer, configs, chat template).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class ModelDir:
    """A model folder on disk (not loaded)."""

    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def config(self) -> dict[str, Any]:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def quantization(self) -> dict[str, Any] | None:
        p = self.path / "quantization.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").is_file() or (self.path / "tokenizer.model").is_file()

    def size_bytes(self) -> int:
        """Bytes of the model graph and its external data (what a deployment ships)."""
        total = 0
        for f in self.path.iterdir():
            if f.is_file() and (f.suffix in (".onnx", ".onnx_data", ".data") or f.name.endswith(".onnx.data")):
                total += f.stat().st_size
        return total


def open_model_dir(path: str | os.PathLike) -> ModelDir:
    """Check that ``path`` is a model folder (or an .onnx file inside one)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        if p.name != MODEL_FILE:
            raise InputError(f"{p}: expected the model folder (with {MODEL_FILE}); pass its folder")
        p = p.parent
    if not p.exists():
        raise InputError(f"no such model folder: {p}")
    if not p.is_dir():
        raise InputError(f"{p} is not a model folder")
    if not (p / MODEL_FILE).is_file():
        raise InputError(f"{p} has no {MODEL_FILE}: not a model folder (run 'qc export' first)")
    return ModelDir(p)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and config files; a failed write names the file being written."""
    for name in SIDE_FILES:
        f = src / name
        if f.is_file():
            try:
                shutil.copy2(f, dst / name)
            except OSError as e:
                if e.errno in _WRITE_ERRNOS:  # shutil names the source file in these errors
                    raise OutputError(f"cannot write {dst / name}: {e.strerror or e}") from None
                raise InputError(f"cannot read {f}: {e.strerror or e}") from None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


#: Written into every output folder qcompiler builds; ``--force`` replaces only folders holding it.
MARKER = ".qcompiler-output"
#: Files by which outputs of qcompiler versions before the marker are recognised.
LEGACY_MARKERS = ("quantization.json", "qcompiler_export.json")


def is_qcompiler_output(path: Path) -> bool:
    """Whether ``path`` is a folder an earlier qcompiler run wrote (``--force`` may replace it)."""
    return path.is_dir() and any((path / m).is_file() for m in (MARKER, *LEGACY_MARKERS))


def check_not_overlapping(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output folder") -> None:
    """Refuse an output that is one of the inputs, contains one or lies inside one (symlinks resolved).

    Replacing such an output (``--force``) or renaming a temporary folder onto it would
    destroy the input; no option allows it.
    """
    o = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        i = Path(given).expanduser().resolve()
        if o == i:
            raise OutputError(f"the {what} {out} is the input {given}; choose another {what}")
        if i in o.parents:
            raise OutputError(f"the {what} {out} is inside the input {given}; choose one outside it")
        if o in i.parents:
            raise OutputError(f"the {what} {out} contains the input {given}; choose one that does not hold it")


def check_output_dir(out: Path, force: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Fail early (before any work) if ``out`` cannot or may not be created.

    ``out`` may not be, contain or lie inside any of ``inputs``.  An existing ``out`` is
    replaced only with ``force`` and only if qcompiler wrote it (its :data:`MARKER` file)
    or it is an empty folder: ``--force`` never deletes a folder of the user's.
    """
    out = Path(out)
    check_not_overlapping(out, inputs)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{out} exists and is not a folder")
        if not force:
            raise OutputError(f"output folder {out} already exists; pass --force to replace it")
        if not is_qcompiler_output(out) and any(out.iterdir()):
            raise OutputError(
                f"output folder {out} exists and was not written by qcompiler (no {MARKER} file); "
                "--force only replaces qcompiler's own outputs: choose another folder or remove it yourself"
            )
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        raise OutputError(f"cannot write into {parent}: {'read-only file system' if read_only else 'permission denied'}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Remove ``.OUT.partial-PID-*`` folders (and restore ``.OUT.old-PID``) of runs that were killed.

    A run that dies without its clean-up (``kill -9``, a power cut) leaves its temporary
    folder; the owning process id in the name tells a dead run from one in progress.
    """
    parent = out.resolve().parent
    if not parent.is_dir():
        return
    for p in sorted(parent.glob(f".{glob.escape(out.name)}.partial-*")):
        pid = _owner_pid(p.name.rsplit(".partial-", 1)[1])
        if pid is not None and not _pid_alive(pid):
            log.info("removing %s, left by an earlier run (process %d) that was killed", p, pid)
            shutil.rmtree(p, ignore_errors=True)
    for p in sorted(parent.glob(f".{glob.escape(out.name)}.old-*")):
        pid = _owner_pid(p.name.rsplit(".old-", 1)[1])
        if pid is None or _pid_alive(pid):
            continue
        if out.exists():
            log.info("removing %s, the previous output an earlier killed run had already replaced", p)
            shutil.rmtree(p, ignore_errors=True)
        else:  # killed between moving the old output aside and moving the new one in
            log.info("restoring %s from %s (an earlier run was killed while replacing it)", out, p)
            os.replace(p, out)


def _owner_pid(tail: str) -> int | None:
    head = tail.split("-", 1)[0]
    return int(head) if head.isdigit() else None


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    The temporary folder is a sibling of ``out`` (same file system, so the final
    ``rename`` is atomic), named ``.OUT.partial-PID-*``; ones of earlier killed runs are
    removed first.  On any exception, Ctrl-C included, it is removed and ``out`` is left
    as it was.  With ``force`` an existing ``out`` that qcompiler wrote is replaced
    (:func:`check_output_dir`; ``out`` may never be, hold or lie in one of ``inputs``).
    """
    out = Path(out)
    inputs = tuple(inputs)
    check_not_overlapping(out, inputs)
    remove_stale_partials(out)  # first: it may restore an output a killed run had moved aside
    check_output_dir(out, force, inputs)
    parent = out.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot create a folder in {parent}: {e.strerror or e}") from None
    try:
        yield tmp
        (tmp / MARKER).write_text(f"written by qcompiler {__version__}; 'qc ... --force' may replace this folder\n")
        check_output_dir(out, force, inputs)  # the same rules again: out may have appeared meanwhile
        _commit(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # name the folder the user asked for, not the temporary one that no longer exists
        if isinstance(e, QCError) and str(tmp) in str(e):
            e.args = (str(e).replace(str(tmp), str(out)),)
        elif isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            name = str(e.filename or tmp).replace(str(tmp), str(out))
            raise OutputError(f"cannot write {name}: {e.strerror or e}") from None
        raise


#: OSError numbers that mean "this output cannot be written" (full, quota, size limit, read-only, denied).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def _commit(tmp: Path, out: Path, force: bool) -> None:
    old: Path | None = None
    if out.exists():
        if not force:
            raise OutputError(f"output folder {out} already exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise OutputError(f"cannot move the result into {out}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    os.chmod(out, 0o755)
