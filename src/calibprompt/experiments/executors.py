"""Where sweep runs and tuning trials execute.

* ``local`` (default): in this process, one task at a time; needs nothing else.
* ``process`` (``--jobs N``): N worker processes on this machine (``concurrent.futures``, spawned, so
  no state is shared by accident), each with cores/N torch threads; for a workstation with many cores
  or several GPUs. Workers write their runs' folders themselves and share the feature cache on disk,
  whose encode lock keeps one encoding per image.
* ``ray``: each task is a Ray task (``num_cpus`` / fractional ``num_gpus`` per task) on a local Ray
  instance or the cluster at ``address``. Ray is imported only when this executor is chosen.

Both run the same task functions (:mod:`calibprompt.experiments.tasks`) and return the same
:class:`Outcome`; a task that raises gives ``ok=False`` with the traceback, never an exception in the
driver, so one failing run cannot stop a sweep.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

EXECUTORS = ("local", "process", "ray")


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    worker: str = ""


def call(fn: Callable[[dict], Any], payload: dict) -> Outcome:
    """Run one task, turning any exception into a failed :class:`Outcome` (with its traceback)."""
    from calibprompt.experiments.store import worker_name

    start = time.perf_counter()
    try:
        value = fn(payload)
    except Exception as err:  # noqa: BLE001 - isolation: the error is recorded, the sweep goes on
        return Outcome(False, None, error_text(err), time.perf_counter() - start, worker_name())
    return Outcome(True, value, None, time.perf_counter() - start, worker_name())


def error_text(err: BaseException) -> str:
    """What the store records for a failed run: the error on its first line, then its traceback."""
    return f"{type(err).__name__}: {err}\n\n" + "".join(traceback.format_exception(err, limit=20))


class LocalExecutor:
    """In-process, sequential. ``next_result`` executes the oldest submitted task."""

    name = "local"

    def __init__(self) -> None:
        self.parallelism = 1
        self._queue: deque = deque()

    def submit(self, fn: Callable[[dict], Any], payload: dict, tag: Any) -> None:
        self._queue.append((tag, fn, payload))

    def pending(self) -> int:
        return len(self._queue)

    def next_result(self) -> tuple[Any, Outcome]:
        tag, fn, payload = self._queue.popleft()
        return tag, call(fn, payload)

    def task_options(self) -> dict:
        return {}

    def close(self) -> None:
        self._queue.clear()


class ProcessExecutor:
    """``jobs`` worker processes on this machine; ``next_result`` waits for whichever task ends first.

    A worker that dies (out of memory, a crash in native code) breaks the shared pool and every task in
    it; each of those tasks is then run again alone, in a process of its own, so only the one that
    crashes again fails and the sweep goes on."""

    name = "process"

    def __init__(self, jobs: int) -> None:
        import os

        check_jobs(jobs)
        self.parallelism = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self._pool = self._new_pool(jobs)
        self._inflight: dict = {}  # future -> (tag, fn, payload, its own pool when run alone, else None)

    @staticmethod
    def _new_pool(workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child of a process that has started torch's thread pools can hang
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[[dict], Any], payload: dict, tag: Any) -> None:
        if getattr(self._pool, "_broken", False):
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool(self.parallelism)
        self._inflight[self._pool.submit(call, fn, payload)] = (tag, fn, payload, None)

    def pending(self) -> int:
        return len(self._inflight)

    def next_result(self) -> tuple[Any, Outcome]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while True:
            done, _ = wait(list(self._inflight), return_when=FIRST_COMPLETED)
            future = next(iter(done))
            tag, fn, payload, alone = self._inflight.pop(future)
            try:
                return tag, future.result()
            except BrokenProcessPool as err:
                if alone is None:  # a suspect: run it again on its own
                    pool = self._new_pool(1)
                    self._inflight[pool.submit(call, fn, payload)] = (tag, fn, payload, pool)
                    continue
                return tag, Outcome(False, None, f"the worker process running this task died ({err}); "
                                                 "out of memory or a crash in native code")
            except Exception as err:  # noqa: BLE001 - anything else the pool reports
                return tag, Outcome(False, None, f"worker process: {type(err).__name__}: {err}")
            finally:
                if alone is not None:
                    alone.shutdown(wait=False)

    def task_options(self) -> dict:
        return {"threads": self.threads}

    def close(self) -> None:
        stopping = bool(self._inflight)  # interrupted: do not wait for the runs still going
        for future, (_tag, _fn, _payload, alone) in self._inflight.items():
            future.cancel()
            if alone is not None:
                alone.shutdown(wait=not stopping, cancel_futures=True)
        self._inflight.clear()
        self._pool.shutdown(wait=not stopping, cancel_futures=True)


def check_jobs(jobs: int, executor: str = "process") -> None:
    """``--jobs`` is a whole number >= 1 and goes with the local / process executors only."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    if executor == "ray" and jobs != 1:
        raise ValueError("--jobs runs cells in processes on this machine; with --executor ray set --cpus-per-run / "
                         "--max-in-flight instead")


class RayExecutor:
    """Ray tasks on a local instance (started here, and shut down by ``close``) or the cluster at
    ``address`` (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``). An already initialised Ray
    (``ray.init`` called by the caller) is used as it is and left running."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: float = 1.0, gpus_per_task: float = 0.0,
                 max_in_flight: int | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError("--executor ray needs Ray: pip install 'calibprompt[ray]'") from None
        if cpus_per_task < 0 or gpus_per_task < 0:
            raise ValueError("--cpus-per-run and --gpus-per-run must be >= 0")
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            # log_to_driver off: workers' output must not reach this process's stdout (--json)
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
            ray.init(**kwargs)
            self._owns = True
        self.cpus_per_task = float(cpus_per_task)
        self.gpus_per_task = float(gpus_per_task)
        self._remote = ray.remote(_ray_call).options(num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task,
                                                     max_retries=0)
        resources = ray.cluster_resources()
        capacity = resources.get("CPU", 1.0) / self.cpus_per_task if self.cpus_per_task > 0 else 1e9
        if self.gpus_per_task > 0:
            gpus = resources.get("GPU", 0.0)
            if gpus <= 0:
                raise ValueError(f"--gpus-per-run {gpus_per_task}: the Ray cluster has no GPUs")
            capacity = min(capacity, gpus / self.gpus_per_task)
        self.parallelism = int(max_in_flight or max(1, int(capacity)))
        self._inflight: dict = {}

    def submit(self, fn: Callable[[dict], Any], payload: dict, tag: Any) -> None:
        self._inflight[self._remote.remote(fn, payload)] = tag

    def pending(self) -> int:
        return len(self._inflight)

    def next_result(self) -> tuple[Any, Outcome]:
        ready, _ = self._ray.wait(list(self._inflight), num_returns=1)
        ref = ready[0]
        tag = self._inflight.pop(ref)
        try:
            outcome = self._ray.get(ref)
        except Exception as err:  # noqa: BLE001 - worker died, task cancelled, object lost...
            outcome = Outcome(False, None, f"ray: {type(err).__name__}: {err}")
        return tag, outcome

    def task_options(self) -> dict:
        """What a task needs to know about its slot (threads, GPU)."""
        return {"threads": max(1, int(self.cpus_per_task)), "gpu": self.gpus_per_task > 0}

    def close(self) -> None:
        for ref in list(self._inflight):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._inflight.clear()
        if self._owns:
            self._ray.shutdown()
            self._owns = False


def _ray_call(fn: Callable[[dict], Any], payload: dict) -> Outcome:
    return call(fn, payload)


def make_executor(name: str = "local", *, ray_address: str | None = None, cpus_per_run: float = 1.0,
                  gpus_per_run: float = 0.0, max_in_flight: int | None = None, jobs: int = 1):
    check_jobs(jobs, name)
    if name in ("local", "process") and gpus_per_run:
        raise ValueError("--gpus-per-run applies to --executor ray; for local runs set device (e.g. --device cuda)")
    if name == "process" or (name == "local" and jobs != 1):
        return ProcessExecutor(jobs)
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(ray_address, cpus_per_run, gpus_per_run, max_in_flight)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
