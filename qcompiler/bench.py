"""``qc bench``: qcompiler recipes against ONNX Runtime's own quantizers, one table.

Every row is a model: the float reference (``fp32``), a qcompiler recipe (any name in
``qcompiler.recipes``) or an ONNX Runtime anchor (``qcompiler.anchors``).  Each row runs
in its own child process — compile, then evaluate, then time — so a crash, a timeout
or the out-of-memory killer costs that row (``failed: <reason>``), not the table, and
each row's compile wall time and peak RSS (``VmHWM``) are its own.

Measured per row, on the same token windows of the same ``--text``:

* perplexity ``exp(mean NLL)``, its change ``Δ% = 100·(ppl/ppl_fp32 − 1)``, and against
  the float model ``KL(p_fp32 ‖ p)`` and top-1 agreement (``qcompiler.eval``); the float
  model's logits are computed once (``fp32`` row) and cached on disk for the other rows;
* size on disk (graph + external data), compile wall time and peak RSS;
* prefill tokens/s (one ``prefill_tokens`` prompt, empty cache, median of repeats) and
  decode tokens/s (``decode_tokens`` greedy steps with the KV cache after that prompt)
  on ONNX Runtime CPU, with the same thread count for every row;
* the KV cache: bytes it grows by per token (every layer's keys and values, in the cache's
  own type: fp32, int8, packed int4), and decode tokens/s at each of ``decode_contexts``
  tokens of context (``context_decode_tokens`` steps on a cache of that length filled with
  random entries of its type: a step's cost depends on the length, not on the values).

Results: ``bench.json`` (everything), ``bench.md`` (the table), ``bench.png``
(perplexity against size), written atomically into the output folder; while the bench
runs, the table so far is rewritten after every row in the hidden partial folder
(``.OUT.partial-*``) that becomes the output folder at the end.

With an executor from ``--ray`` (:mod:`qcompiler.distributed`) the float reference runs
first, here, and every other row becomes a Ray task (which still runs the row in its own
child process, with its timeout) declaring as many CPUs as the rows' ORT threads, so
rows run side by side on a cluster; the table keeps the order of the rows.  On one
machine, rows that run at the same time share its memory bandwidth: compare speed
columns only from runs without ``--ray`` (or one row per machine).

Plugins: ``QC_PLUGINS=mod1,mod2`` names modules imported before recipes are looked up
(in this process and in every row's process), so a recipe registered by a plugin
appears as a row like any other.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qcompiler import __version__
from qcompiler.artifact import atomic_output_dir, open_model_dir, write_json
from qcompiler.errors import InputError, QCError
from qcompiler.recipes import QuantizeOptions

if TYPE_CHECKING:
    from qcompiler.eval import LogitsSource

log = logging.getLogger(__name__)

#: the reference row is named after the model's float type (:func:`reference_name`)
REFERENCE_NAMES = ("fp32", "fp16", "bf16")
#: a bench row that is a model folder built elsewhere: ``dir:PATH`` (evaluated and timed, not compiled)
FOLDER_PREFIX = "dir:"
PLUGINS_ENV = "QC_PLUGINS"


@dataclass(frozen=True)
class BenchConfig:
    """How rows are evaluated and timed (the same for every row)."""

    # Defaults sized so that every recipe and anchor on SmolLM2-135M fits in about 30 minutes on 2 cores:
    # the comparison is paired (same windows for every row), so 2048 tokens resolve Δ% and KL well.
    eval_tokens: int = 2048  # tokens of --text scored (eval_tokens / seq_len windows)
    seq_len: int = 512
    prefill_tokens: int = 512
    decode_tokens: int = 128
    prefill_repeats: int = 2  # timed prefills after one warm-up; the median is reported
    decode_contexts: tuple[int, ...] = (512, 4096)  # decode tok/s with this many tokens already cached
    context_decode_tokens: int = 16
    threads: int = 0  # ORT intra-op threads; 0 = all cores
    spin: bool = False  # ORT thread spinning (off: fairer numbers on a shared machine)
    speed: bool = True
    row_timeout_s: float = 3600.0
    keep_models: bool = False

    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class BenchRow:
    name: str
    kind: str  # reference | recipe | anchor
    description: str = ""
    status: str = "ok"  # ok | failed | skipped
    error: str | None = None
    perplexity: float | None = None
    delta_pct: float | None = None
    kl: float | None = None
    top1: float | None = None
    size_bytes: int | None = None
    compile_s: float | None = None
    compile_cpu_s: float | None = None  # CPU time (user + system) of the compile step: robust to contention
    compile_peak_rss_mb: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    cache_bytes_per_token: int | None = None
    decode_tok_s_at: dict[str, float] | None = None  # context length → decode tok/s
    eval_s: float | None = None
    row_wall_s: float | None = None
    row_cpu_s: float | None = None  # CPU time of the row's whole process
    pipeline: str | None = None
    loadavg: float | None = None  # 1-minute load average when the row started (contention)
    model_dir: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def status_text(self) -> str:
        return "ok" if self.ok else f"{self.status}: {self.error}"


@dataclass
class BenchResult:
    model: str
    text: str
    calib: str | None
    config: BenchConfig
    options: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def row(self, name: str) -> BenchRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": self.text,
            "calib": self.calib,
            "config": asdict(self.config),
            "options": self.options,
            "environment": self.environment,
            "wall_s": self.wall_s,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_markdown(self) -> str:
        from qcompiler.bench_report import render_markdown

        return render_markdown(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """Read back what :meth:`to_dict` wrote (``bench.json``); unknown keys are ignored."""
        known = {f.name for f in fields(BenchRow)}
        rows = [BenchRow(**{k: v for k, v in r.items() if k in known}) for r in data.get("rows", [])]
        cfg_known = {f.name for f in fields(BenchConfig)}
        cfg = {k: v for k, v in data.get("config", {}).items() if k in cfg_known}
        if "decode_contexts" in cfg:
            cfg["decode_contexts"] = tuple(cfg["decode_contexts"])
        config = BenchConfig(**cfg)
        return cls(data["model"], data["text"], data.get("calib"), config, data.get("options", {}), rows,
                   data.get("environment", {}), data.get("wall_s", 0.0))


# ----------------------------------------------------------------------------- row names


def load_plugins() -> None:
    """Import the modules named in ``$QC_PLUGINS`` (comma-separated), e.g. extra recipes."""
    for mod in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise QCError(f"cannot import plugin module '{mod}' named in ${PLUGINS_ENV}: {e}") from None


def resolve_rows(names: str | list[str] | None) -> list[tuple[str, str]]:
    """``[(name, kind)]`` for ``names`` (comma-separated or a list; ``all``, ``recipes``, ``anchors``)."""
    from qcompiler.anchors import ANCHORS
    from qcompiler.recipes import available_recipes

    load_plugins()
    recipes = available_recipes()
    if names is None:
        names = ["all"]
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    folders: list[str] = []
    for item in names:
        for name in filter(None, (n.strip() for n in item.split(","))):
            if name.startswith(FOLDER_PREFIX):  # a model folder built elsewhere (e.g. qc export --keep-gguf-quant)
                open_model_dir(name[len(FOLDER_PREFIX):])
                folders.append(name)
                continue
            expand = {"all": [*recipes, *ANCHORS], "recipes": list(recipes), "anchors": list(ANCHORS)}.get(name, [name])
            wanted.extend(n for n in expand if n not in wanted and n not in REFERENCE_NAMES)
    unknown = [n for n in wanted if n not in recipes and n not in ANCHORS]
    if unknown:
        raise QCError(
            f"unknown recipe/anchor {', '.join(repr(n) for n in unknown)}; "
            f"choices: {', '.join([*recipes, *ANCHORS])} (or all, recipes, anchors)"
        )
    return [(n, "recipe" if n in recipes else "anchor") for n in wanted] + [(f, "folder") for f in folders]


def _describe(name: str, kind: str) -> tuple[str, bool]:
    """(description, needs calibration) of a row."""
    if kind == "reference":
        return "float model (reference)", False
    if kind == "folder":
        return f"model folder {name[len(FOLDER_PREFIX):]} (built elsewhere)", False
    if kind == "anchor":
        from qcompiler.anchors import ANCHORS

        a = ANCHORS[name]
        return a.description, a.needs_calibration
    from qcompiler.recipes import get_recipe

    r = get_recipe(name)
    return r.description, r.needs_calibration


# ----------------------------------------------------------------------------- the table


def run_bench(
    model_dir: str | os.PathLike,
    text: str | os.PathLike,
    calib: str | os.PathLike | None = None,
    recipes: str | list[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    config: BenchConfig | None = None,
    options: QuantizeOptions | None = None,
    force: bool = False,
    executor: Any = None,
) -> BenchResult:
    """Run the reference, ``recipes`` (recipes and anchors; default all) and write the report.

    With ``out_dir`` the report (``bench.json``, ``bench.md``, ``bench.png``) and, with
    ``config.keep_models``, each row's model folder under ``models/`` are written there
    atomically; without it, only the returned :class:`BenchResult` remains.  ``executor``
    (``qcompiler.distributed``, ``--ray``) runs the rows after the reference as tasks.
    """
    from qcompiler.bench_report import write_report
    from qcompiler.data import read_text

    config = config or BenchConfig()
    options = options or QuantizeOptions()
    src = open_model_dir(model_dir)
    read_text(text)  # fail now on a bad text, not in every row
    calib = calib if calib is not None else options.calib
    if calib is not None:
        read_text(calib)
        options = replace(options, calib=str(Path(calib).resolve()))
    reference = reference_name(src.path)
    rows = [(reference, "reference"), *resolve_rows(recipes)]
    t0 = time.perf_counter()
    result = BenchResult(
        model=str(src.path),
        text=str(text),
        calib=str(calib) if calib is not None else None,
        config=config,
        options={k: v for k, v in asdict(options).items() if v is not None},
        environment=_environment(config),
    )
    ctx = atomic_output_dir(out_dir, force, (src.path, text, calib)) if out_dir is not None else _scratch_dir()
    with ctx as root:
        work = Path(tempfile.mkdtemp(prefix="work-", dir=root))
        try:
            done: list[BenchRow] = []
            if executor is not None and executor.distributed:
                from qcompiler.distributed import Resources

                ref = _run_row_process(reference, "reference", src.path, Path(text), options, config, work, root)
                jobs = [(name, kind, src.path, Path(text), options, config, work, root) for name, kind in rows[1:]]
                cpus = float(config.resolved_threads())  # what each row's ONNX Runtime uses
                done = [ref, *executor.map(_run_row_process, jobs, Resources(cpus, None), desc="bench rows")]
            for i, (name, kind) in enumerate(rows, 1):
                log.info("bench [%d/%d] %s", i, len(rows), name)
                row = done[i - 1] if done else _run_row_process(name, kind, src.path, Path(text), options, config,
                                                                 work, root)
                if kind == "reference" and not row.ok:
                    raise QCError(f"the float reference row failed ({row.error}); nothing to compare against")
                _finish_row(row, result.rows[0] if result.rows else None)
                result.rows.append(row)
                log.info("bench %s: %s", name, _row_brief(row))
                if out_dir is not None:  # the table so far, readable in the partial folder while the bench runs
                    result.wall_s = round(time.perf_counter() - t0, 1)
                    write_report(result, root, with_plot=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.wall_s = round(time.perf_counter() - t0, 1)
        result.environment["loadavg_end"] = round(os.getloadavg()[0], 2)
        if out_dir is not None:
            write_report(result, root)
    return result


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qc-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _environment(config: BenchConfig) -> dict[str, Any]:
    import platform

    import onnxruntime as ort

    return {
        "qcompiler": __version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": config.resolved_threads(),
        "spin": config.spin,
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def _finish_row(row: BenchRow, ref: BenchRow | None) -> None:
    if row.ok and ref is not None and ref.perplexity and row.perplexity is not None:
        row.delta_pct = 100.0 * (row.perplexity / ref.perplexity - 1.0)


def _row_brief(row: BenchRow) -> str:
    if not row.ok:
        return row.status_text()
    parts = [f"ppl {row.perplexity:.3f}"]
    if row.delta_pct is not None:
        parts.append(f"Δ {row.delta_pct:+.2f}%")
    if row.size_bytes is not None:
        parts.append(f"{row.size_bytes / 1e6:.1f} MB")
    return ", ".join(parts)


def reference_name(model_dir: Path) -> str:
    """The reference row's name: the model's float type (``fp32``, ``fp16`` or ``bf16``)."""
    from qcompiler.floattype import file_float_type, type_name

    return type_name(file_float_type(model_dir))


def _run_row_process(
    name: str, kind: str, model_dir: Path, text: Path, options: QuantizeOptions, config: BenchConfig, work: Path, root: Path
) -> BenchRow:
    """Run one row in a child process and read its result; any failure becomes a failed row."""
    description, needs_calib = _describe(name, kind)
    folder = Path(name[len(FOLDER_PREFIX):]).resolve() if kind == "folder" else None
    if folder is not None:
        name = folder.name
    row = BenchRow(name=name, kind=kind, description=description, loadavg=round(os.getloadavg()[0], 2))
    if needs_calib and not options.calib:
        row.status, row.error = "skipped", "needs calibration data (--calib)"
        return row
    models = (root / "models") if config.keep_models else (work / "models")
    spec = {
        "name": name,
        "kind": kind,
        "model_dir": str(model_dir.resolve()),
        "out_dir": str(model_dir.resolve()) if kind == "reference" else str(folder or models / name),
        "text": str(Path(text).resolve()),
        "options": asdict(options),
        "config": asdict(config),
        "ref_logits": str(work / "ref_logits"),
        "ref_name": reference_name(model_dir),
    }
    spec_path = work / f"{name}.spec.json"
    result_path = work / f"{name}.result.json"
    log_path = work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "qcompiler.bench", str(spec_path), str(result_path)]
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=config.row_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        except BaseException:  # Ctrl-C: take the row's process group down with us
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    row.row_wall_s = round(time.perf_counter() - t0, 1)
    row.row_cpu_s = round(_children_cpu_s() - cpu0, 1)
    data: dict[str, Any] = {}
    if result_path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            data = json.loads(result_path.read_text())
    if rc is None:
        row.status, row.error = "failed", f"timed out after {config.row_timeout_s:g} s"
    elif data.get("error"):
        row.status, row.error = "failed", str(data["error"])
    elif rc != 0 or not data:
        row.status, row.error = "failed", _crash_reason(rc, log_path)
    else:
        known = {f.name for f in fields(BenchRow)}
        for k, v in data.items():
            if k in known and k not in ("name", "kind", "description", "status", "error", "loadavg", "row_wall_s"):
                setattr(row, k, v)
        if kind == "folder":
            row.model_dir = str(folder)
        elif kind != "reference":
            if config.keep_models:
                row.model_dir = f"models/{name}"  # relative to the output folder
            else:
                row.model_dir = None
                shutil.rmtree(models / name, ignore_errors=True)
    if not row.ok:
        (root / "logs").mkdir(exist_ok=True)
        shutil.copy(log_path, root / "logs" / f"{name}.log")
        log.warning("bench %s failed: %s (logs/%s.log ends with)\n%s", name, row.error, name, _tail(log_path, 8))
        shutil.rmtree(models / name, ignore_errors=True)
    return row


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _tail(path: Path, n: int) -> str:
    """The last ``n`` non-empty lines of a row's log (progress bars' carriage returns split lines)."""
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join([ln for ln in lines if ln.strip()][-n:])


def _crash_reason(rc: int | None, log_path: Path) -> str:
    if rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"killed by {sig}{hint}"
    last = ""
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
    return f"exit code {rc}" + (f": {last[:300]}" if last else "")


# ----------------------------------------------------------------------------- one row (child)


class CachedLogits:
    """The reference model's logits per window, computed once and read back from ``.npy`` files.

    A :class:`qcompiler.eval.LogitsSource` for ``evaluate_windows``.
    """

    def __init__(self, folder: Path, windows: np.ndarray) -> None:
        self.folder = folder
        self.index = {np.asarray(w, dtype=np.int64).tobytes(): i for i, w in enumerate(windows)}

    @classmethod
    def write(cls, folder: Path, runner: LogitsSource, windows: np.ndarray) -> CachedLogits:
        """Compute ``runner``'s logits of every window into ``folder`` and read them from there."""
        folder.mkdir(parents=True, exist_ok=True)
        for i, ids in enumerate(windows):
            np.save(folder / f"{i}.npy", runner.logits(ids))
        return cls(folder, windows)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        i = self.index.get(np.asarray(ids, dtype=np.int64).tobytes())
        path = self.folder / f"{i}.npy"
        if i is None or not path.is_file():
            raise QCError("internal error: no cached reference logits for this window")
        return np.load(path)


@dataclass(frozen=True)
class Speed:
    prefill_tok_s: float
    decode_tok_s: float | None


def measure_speed(runner: Any, prompt: np.ndarray, decode_tokens: int, repeats: int = 3) -> Speed:
    """Prefill tokens/s (median of ``repeats`` after a warm-up) and greedy decode tokens/s."""
    prompt = np.asarray(prompt, dtype=np.int64)
    outputs = ["logits", *runner.present_names]
    runner.session.run(outputs, runner.feeds(prompt))  # warm-up
    times = []
    outs: list[np.ndarray] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        outs = runner.session.run(outputs, runner.feeds(prompt))
        times.append(time.perf_counter() - t0)
    prefill = len(prompt) / float(np.median(times))
    if not runner.has_kv_cache or decode_tokens <= 0:
        return Speed(prefill, None)
    past = dict(zip(runner.past_names, outs[1:]))
    past_len = len(prompt)
    nxt = int(np.argmax(outs[0][0, -1]))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        outs = runner.session.run(outputs, runner.feeds(np.array([nxt], dtype=np.int64), past, past_len))
        past_len += 1
        past = dict(zip(runner.past_names, outs[1:]))
        nxt = int(np.argmax(outs[0][0, -1]))
    return Speed(prefill, decode_tokens / (time.perf_counter() - t0))


def random_past(runner: Any, context: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A cache of ``context`` tokens of the runner's cache type, random entries (for timing only)."""
    kv = runner.kv
    rng = np.random.default_rng(seed)
    shape = (1, kv.kv_heads, context, kv.head_dim)
    if kv.dtype.kind == "f":
        arr = (rng.standard_normal(shape) * 0.5).astype(kv.dtype)
    else:
        info = np.iinfo(kv.dtype)
        arr = rng.integers(info.min, int(info.max) + 1, shape).astype(kv.dtype)
    return {n: arr for n in runner.past_names}


def decode_speed_at(runner: Any, context: int, steps: int) -> float | None:
    """Decode tokens/s with ``context`` tokens already in the cache (one warm-up step, then ``steps``)."""
    if not runner.has_kv_cache or steps <= 0:
        return None
    past, past_len, nxt = random_past(runner, context), context, 1
    outputs = ["logits", *runner.present_names]
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        outs = runner.session.run(outputs, runner.feeds(np.array([nxt], dtype=np.int64), past, past_len))
        past, past_len = dict(zip(runner.past_names, outs[1:])), past_len + 1
        nxt = int(np.argmax(outs[0][0, -1]))
    return steps / (time.perf_counter() - t0)


def _prompt_tokens(tokens: np.ndarray, n: int) -> np.ndarray:
    if len(tokens) == 0:
        raise InputError("the evaluation text has no tokens")
    return np.resize(tokens, n)  # repeats a short text


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile, evaluate and time one row (runs in the row's own process)."""
    from qcompiler.anchors import AnchorSettings, run_anchor
    from qcompiler.data import make_windows, read_text, tokenize
    from qcompiler.eval import evaluate_windows
    from qcompiler.memory import peak_rss_mb
    from qcompiler.quantize import quantize
    from qcompiler.runtime import open_runner

    load_plugins()
    cfg = BenchConfig(**spec["config"])
    opts = QuantizeOptions(**spec["options"])
    name, kind = spec["name"], spec["kind"]
    src, out = Path(spec["model_dir"]), Path(spec["out_dir"])
    res: dict[str, Any] = {}
    t0, cpu0 = time.perf_counter(), _self_cpu_s()
    if kind == "recipe":
        summary = quantize(src, out, recipe=name, options=opts, force=True)
        res["pipeline"] = summary.get("pipeline")
    elif kind == "anchor":
        settings = AnchorSettings(opts.bits, opts.group_size, opts.calib, opts.calib_samples, opts.seq_len)
        run_anchor(name, src, out, settings, force=True)
    if kind not in ("reference", "folder"):
        res["compile_s"] = round(time.perf_counter() - t0, 2)
        res["compile_cpu_s"] = round(_self_cpu_s() - cpu0, 2)
        res["compile_peak_rss_mb"] = round(peak_rss_mb(), 1)
    md = open_model_dir(out)
    res["size_bytes"] = md.size_bytes()
    res["model_dir"] = str(out)

    tokens = tokenize(src, read_text(spec["text"]))
    windows = make_windows(tokens, cfg.seq_len, cfg.eval_tokens).ids
    runner = open_runner(out, threads=cfg.resolved_threads(), spin=cfg.spin)
    ref_dir = Path(spec["ref_logits"])
    t1 = time.perf_counter()
    if kind == "reference":
        ev = evaluate_windows(CachedLogits.write(ref_dir, runner, windows), windows, name=name, progress=False)
        res.update(perplexity=ev.perplexity, kl=0.0, top1=1.0)
    else:
        ref = CachedLogits(ref_dir, windows)
        ev = evaluate_windows(runner, windows, ref, name=name, ref_name=spec["ref_name"], progress=False)
        res.update(perplexity=ev.perplexity, kl=ev.kl, top1=ev.top1_agreement)
    res["eval_s"] = round(time.perf_counter() - t1, 2)
    if cfg.speed:
        sp = measure_speed(runner, _prompt_tokens(tokens, cfg.prefill_tokens), cfg.decode_tokens, cfg.prefill_repeats)
        res["prefill_tok_s"] = round(sp.prefill_tok_s, 2)
        res["decode_tok_s"] = round(sp.decode_tok_s, 2) if sp.decode_tok_s is not None else None
        if runner.has_kv_cache and cfg.context_decode_tokens > 0:
            at = {str(c): decode_speed_at(runner, c, cfg.context_decode_tokens) for c in cfg.decode_contexts}
            res["decode_tok_s_at"] = {c: round(v, 2) for c, v in at.items() if v is not None}
    if runner.kv is not None:
        res["cache_bytes_per_token"] = runner.kv.bytes_per_token
    return res


def _child_main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    spec = json.loads(spec_path.read_text())
    try:
        res = run_row(spec)
    except QCError as e:
        res = {"error": str(e)}
    except MemoryError:
        res = {"error": "out of memory"}
    except Exception as e:  # a bug in a recipe or an anchor: one row, not the table
        import traceback

        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res = {"error": f"{type(e).__name__}: {first}"[:400]}
    write_json(result_path, res)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
