"""Where independent pieces of work run: in this process, or as Ray tasks (``--ray [local|ADDRESS]``).

An :class:`Executor` maps a module-level function over a list of argument tuples and
returns the results *in the order of the calls*, whatever order they finish in — so
every reduction the caller does afterwards (merging calibration shards, assembling
sensitivity rows) is the same as in one process.  :class:`InProcess` runs the calls
one after the other; :class:`RayExecutor` submits each call as a Ray task with declared
resources (``num_cpus``, ``memory`` in bytes) and waits for all of them.

Ray is imported only by :class:`RayExecutor`, only when work is submitted: without
``--ray`` nothing imports it.  ``--ray local`` starts a Ray instance on this machine
(one worker process per core, no dashboard) and stops it when the command ends;
``--ray ADDRESS`` (``ray://host:10001`` or ``host:6379``) connects to a running
cluster, and its workers need qcompiler installed and the model folder, the
calibration text and the statistics folder on a shared file system (the tasks read
weights and write hand-offs by path; only small arguments and results travel through
Ray's object store, see ``docs/scaling.md``).  If Ray is already initialized in the
process (tests, notebooks), that instance is used and left running.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from qcompiler.errors import OptionError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Resources:
    """What one task needs: CPU cores and memory in bytes (Ray schedules by them)."""

    num_cpus: float = 1.0
    memory: int | None = None


class Executor:
    """Runs calls in this process, in order (the default: no ``--ray``)."""

    distributed = False
    name = "in-process"

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]], resources: Resources = Resources(),
            desc: str = "") -> list[T]:
        """``[fn(*c) for c in calls]``, results in call order."""
        return [fn(*c) for c in calls]

    def workers(self) -> int:
        return 1

    def close(self) -> None:
        """Release what this executor started."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


InProcess = Executor


class RayExecutor(Executor):
    """Runs calls as Ray tasks (see module docstring); ``address`` is ``local`` or a cluster address."""

    distributed = True

    def __init__(self, address: str = "local", num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.name = f"ray ({address})"
        self._started = False
        self._remotes: dict[Callable[..., Any], Any] = {}

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise OptionError('--ray needs Ray: pip install -e ".[ray]" (or pip install "ray>=2.40")') from None
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if self.address == "local":
                # local workers import qcompiler from where this process does
                import qcompiler

                root = os.path.dirname(os.path.dirname(os.path.abspath(qcompiler.__file__)))
                path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
                os.environ["PYTHONPATH"] = path  # inherited by the raylet and its workers
                kw["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            else:
                kw["address"] = self.address
            try:
                ray.init(**kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise OptionError(f"--ray {self.address}: cannot start or reach Ray: {str(e).splitlines()[0]}") from None
            self._started = True
            log.info("ray: %s, %s CPU(s), %.1f GiB of task memory", self.address,
                     ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("memory", 0) / 2**30)
        return ray

    def workers(self) -> int:
        return int(self._ray().cluster_resources().get("CPU", 1))

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]], resources: Resources = Resources(),
            desc: str = "") -> list[T]:
        if not calls:
            return []
        ray = self._ray()
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = ray.remote(fn)
        opts: dict[str, Any] = {"num_cpus": resources.num_cpus, "max_retries": 2}
        if resources.memory:
            # never more than the cluster has: such a task would wait forever
            have = int(ray.cluster_resources().get("memory", 0))
            opts["memory"] = min(int(resources.memory), have) if have else int(resources.memory)
        refs = [remote.options(**opts).remote(*c) for c in calls]
        log.info("ray: %d task(s) %s (%g CPU, %s memory each)", len(refs), desc, resources.num_cpus,
                 f"{opts['memory'] / 2**20:.0f} MiB" if "memory" in opts else "undeclared")
        try:
            return list(ray.get(refs))  # in submission order, whatever finished first
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def make_executor(ray: str | None) -> Executor:
    """``--ray`` → an executor: None → in this process, ``local`` / ``ADDRESS`` → Ray."""
    if ray is None:
        return Executor()
    if not str(ray).strip():
        raise OptionError("--ray needs 'local' or a cluster address (e.g. ray://head:10001)")
    return RayExecutor(str(ray).strip())


def add_ray_argument(parser: Any, what: str) -> None:
    """The ``--ray [local|ADDRESS]`` option of a command (``what``: the work that becomes tasks)."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="local|ADDRESS",
                        help=f"run {what} as Ray tasks: 'local' (the default when given alone) starts Ray on this "
                             "machine, ADDRESS joins a cluster (pip install -e '.[ray]'; docs/scaling.md)")
