"""Where a batch's inputs are explained: this process, a pool of processes, or a Ray cluster.

Each backend builds the job once per worker (:meth:`~segcam.apps.batch.job.BatchJob.build`) and
yields one :data:`Outcome` per input as it finishes; one failing input never stops the others.

- this process: :func:`run_here` (``num_workers=1``);
- processes: :func:`run_processes`, ``num_workers`` spawned processes;
- Ray: :func:`run_ray`, an actor pool of ``num_workers`` actors on a Ray cluster (``address``:
  ``None`` starts a local one, ``"auto"`` joins a running one, ``"ray://host:10001"`` a remote
  one), ``gpus_per_worker`` GPUs each. Workers write the outputs, so ``out`` must be on a file
  system every node sees.

A worker that dies (the OOM killer, a segfault in a C reader, a kill) fails only the input it
held: a new worker takes its place and the input is tried once more; a second death is its
failure ("worker died (signal 9, SIGKILL)"), the others go on. A job that a worker cannot load
(a bad model) is the batch's one error, as in this process. Workers stop when the run's process
dies (Linux: a parent-death signal; elsewhere they check before each input) and commit a
manifest only while the folder's run id is still their run's
(:meth:`~segcam.apps.batch.outputs.RunClaim.committing`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from segcam.apps.batch.job import BatchJob, InputExplainer, Progress
from segcam.apps.batch.outputs import RunClaim
from segcam.errors import SegCamError

__all__ = ["Outcome", "WorkerError", "run_here", "run_one", "run_processes", "run_ray"]


class Outcome(NamedTuple):
    """What became of one input."""

    position: int  # among the job's inputs, from 1
    path: Path
    ok: bool
    message: str  # the error, when not ok
    files: int  # files written
    seconds: float
    retried: str = ""  # why it was tried a second time (its first worker died), or ""


class WorkerError(SegCamError, RuntimeError):
    """A worker could not load the job (the batch's error, not one input's)."""


def run_one(
    explainer: InputExplainer,
    path: Path,
    out: Path,
    within: Progress | None = None,
    run: RunClaim | None = None,
) -> tuple[bool, str, int, float]:
    """Explain one input: (ok, error message, files written, seconds); never raises."""
    started = time.perf_counter()
    try:
        written = explainer.explain(path, out, within, run)
    except Exception as error:  # any failure of one input is reported; the others go on
        return False, _message(error, path), 0, _since(started)
    return True, "", len(written), _since(started)


def _without_path(message: str, path: Path) -> str:
    """An input's error without its own path in front: the report's line names it already."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def run_here(
    job: BatchJob,
    todo: list[tuple[int, Path]],
    out: Path,
    within: Progress | None,
    run: RunClaim | None = None,
    *,
    raise_errors: bool = False,
) -> Generator[Outcome, None, None]:
    """In this process: the job built once, the inputs in order.

    Each input's files are written on a writer thread while the next input computes (at most
    one write waits; the outcomes come in the inputs' order). With ``raise_errors`` an input's
    error is raised, not reported (a single input's error is the command's).
    """
    explainer = job.build()
    if raise_errors or len(todo) == 1:
        for index, path in todo:
            if raise_errors:
                started = time.perf_counter()
                written = explainer.explain(path, out, within, run)
                yield Outcome(index, path, True, "", len(written), time.perf_counter() - started)
            else:
                yield Outcome(index, path, *run_one(explainer, path, out, within, run))
        return
    # the next input computes while the previous one's files are compressed and written, on
    # one writer thread; one write waits at most (the queue is bounded: two inputs' maps)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segcam-writer") as writer:
        pending: tuple[int, Path, float, Future[tuple[list[Path], float]]] | None = None
        try:
            for index, path in todo:
                started = time.perf_counter()
                try:
                    finish = explainer.prepare(path, out, within, run)
                except KeyboardInterrupt:  # the write in flight ends and is reported first
                    if pending is not None:
                        done, pending = pending, None
                        yield _written(*done)
                    raise
                except Exception as error:  # this input's failure; the others go on
                    if pending is not None:
                        yield _written(*pending)
                        pending = None
                    yield Outcome(index, path, False, _message(error, path), 0, _since(started))
                    continue
                if pending is not None:
                    yield _written(*pending)
                pending = (index, path, started, writer.submit(_timed, finish))
            if pending is not None:
                yield _written(*pending)
                pending = None
        finally:  # an interrupted run still lets the write in flight end (atomic, manifest last)
            if pending is not None:
                wait([pending[3]])


def _since(started: float) -> float:
    return time.perf_counter() - started


def _message(error: Exception, path: Path) -> str:
    if isinstance(error, SegCamError):
        return _without_path(str(error), path)
    return f"{type(error).__name__}: {error}"


def _timed(finish: Callable[[], list[Path]]) -> tuple[list[Path], float]:
    """Run a write step; return its files and when it ended."""
    return finish(), time.perf_counter()


def _written(
    index: int, path: Path, started: float, write: Future[tuple[list[Path], float]]
) -> Outcome:
    """The outcome of an input whose write step ran on the writer thread."""
    try:
        written, ended = write.result()
    except Exception as error:  # a full disk, a changed input: this input's failure
        return Outcome(index, path, False, _message(error, path), 0, _since(started))
    return Outcome(index, path, True, "", len(written), ended - started)


def _death(exitcode: int | None) -> str:
    """How a worker ended: "worker died (signal 9, SIGKILL)" or "worker exited with status 3"."""
    if exitcode is not None and exitcode < 0:
        try:
            name = f", {signal.Signals(-exitcode).name}"
        except ValueError:
            name = ""
        return f"worker died (signal {-exitcode}{name})"
    return f"worker exited with status {exitcode} while explaining it"


@dataclass
class _Attempts:
    """The inputs still to do; one whose worker died goes back to the front, once."""

    todo: deque[tuple[int, Path]]
    deaths: dict[int, str] = field(default_factory=dict)

    def died(self, index: int, path: Path, reason: str) -> Outcome | None:
        """Its worker died: tried again (None), or, the second time, its failure."""
        if index in self.deaths:
            return Outcome(index, path, False, f"{reason}, twice: not tried again", 0, 0.0)
        self.deaths[index] = reason
        self.todo.appendleft((index, path))
        return None

    def outcome(self, index: int, path: Path, result: tuple[bool, str, int, float]) -> Outcome:
        """An input's outcome, noting a first attempt whose worker died."""
        return Outcome(index, path, *result, retried=self.deaths.get(index, ""))


def _parent_death_signal() -> None:
    """Linux: this process is killed when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the liveness checks remain
        pass


def _worker_main(job: BatchJob, connection: Any, run: RunClaim) -> None:
    """A worker process: load the job once, then explain the inputs it is sent, one at a time."""
    _parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the run, which stops its workers
    if not run.alive():  # the parent died before the signal was armed
        os._exit(0)
    torch.set_num_threads(1)
    try:
        explainer = job.build()
    except Exception as error:  # the batch's error: sent, raised by the parent
        connection.send(("build-failed", _portable(error)))
        return
    connection.send(("ready",))
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None or not run.alive():
            return
        index, path = task
        result = run_one(explainer, Path(path), run.out, None, run)
        connection.send(("done", index, result))


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a :class:`WorkerError` with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return WorkerError(f"{type(error).__name__}: {error}")
    return error


def _build_failed(error: Exception) -> Exception:
    if isinstance(error, SegCamError):
        return error
    return WorkerError(f"a worker could not load the job: {type(error).__name__}: {error}")


@dataclass
class _Process:
    process: Any
    connection: Any
    ready: bool = False
    held: tuple[int, Path] | None = None


def run_processes(
    job: BatchJob,
    todo: list[tuple[int, Path]],
    out: Path,
    workers: int,
    run: RunClaim,
) -> Generator[Outcome, None, None]:
    """``workers`` spawned processes, each loading the job once; a dead one fails only its input.

    Each worker has its own pipe, so the input a dead worker held is known: it goes back to the
    front of the queue once, a new worker takes the dead one's place, and the others go on.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    claim = run.in_worker()
    attempts = _Attempts(deque(todo))
    pool: list[_Process] = []

    def start() -> None:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_worker_main, args=(job, child_end, claim), daemon=True)
        # Ctrl+C signals the whole group: a worker starts with SIGINT ignored (kept across exec,
        # and Python keeps an ignored SIGINT), so even while it imports, the run alone answers
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        child_end.close()
        pool.append(_Process(process, parent_end))

    def dispatch(worker: _Process) -> None:
        if attempts.todo:
            worker.held = attempts.todo.popleft()
            worker.connection.send((worker.held[0], str(worker.held[1])))
        else:
            worker.held = None
            worker.connection.send(None)

    try:
        for _ in range(min(workers, len(todo))):
            start()
        while pool:
            waiting = {w.connection: w for w in pool} | {w.process.sentinel: w for w in pool}
            for ready in wait(list(waiting)):
                worker = waiting[ready]
                if worker not in pool:
                    continue
                message = None
                try:
                    if worker.connection.poll():
                        message = worker.connection.recv()
                except (EOFError, OSError):
                    message = None
                if message is None and ready is worker.connection and worker.process.is_alive():
                    worker.process.join(10)  # its pipe closed: it is ending
                if message is None and not worker.process.is_alive():  # stopped, or died
                    worker.process.join()
                    pool.remove(worker)
                    ended = _death(worker.process.exitcode)
                    if not worker.ready:
                        raise WorkerError(f"a worker ended while loading the job: {ended}")
                    if worker.held is not None:
                        failed = attempts.died(*worker.held, ended)
                        if failed is not None:
                            yield failed
                    if attempts.todo and len(pool) < min(workers, len(attempts.todo)):
                        start()
                    continue
                if message is None:
                    continue
                if message[0] == "build-failed":
                    raise _build_failed(message[1])
                if message[0] == "ready":
                    worker.ready = True
                else:
                    _, index, result = message
                    assert worker.held is not None
                    path = worker.held[1]
                    worker.held = None
                    yield attempts.outcome(index, path, result)
                dispatch(worker)
    finally:
        for worker in pool:
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join()
            worker.connection.close()


def run_ray(
    job: BatchJob,
    todo: list[tuple[int, Path]],
    out: Path,
    workers: int,
    address: str | None,
    gpus: float,
    run: RunClaim,
) -> Generator[Outcome, None, None]:
    """A pool of Ray actors, ``gpus`` GPUs each; a dead actor fails only its input.

    As with processes: the input of an actor that died is tried once more on a new actor, and
    the others go on. Ray's own restarts are off, so each input is tried at most twice.
    """
    try:
        import ray
    except ImportError:
        raise SegCamError("the ray backend needs Ray: pip install 'segcam[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    claim = run
    try:

        @ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0, max_task_retries=0)
        class Worker:
            def __init__(self, spec: BatchJob) -> None:
                torch.set_num_threads(1)
                self.failed: Exception | None = None
                try:
                    self.job: InputExplainer | None = spec.build()
                except Exception as error:  # the batch's error: returned, raised by the driver
                    self.job, self.failed = None, _portable(error)

            def run(self, path: str) -> tuple[bool, str, int, float] | Exception:
                if self.job is None:
                    assert self.failed is not None
                    return self.failed
                return run_one(self.job, Path(path), claim.out, None, claim)

        remote: Any = Worker
        attempts = _Attempts(deque(todo))
        running: dict[Any, tuple[Any, int, Path]] = {}

        def submit(actor: Any) -> None:
            if attempts.todo:
                index, path = attempts.todo.popleft()
                running[actor.run.remote(str(path))] = (actor, index, path)

        for _ in range(min(workers, len(todo))):
            submit(remote.remote(job))
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, index, path = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:  # the actor died holding this input
                failed = attempts.died(index, path, f"worker died ({type(error).__name__})")
                if failed is not None:
                    yield failed
                if attempts.todo:
                    submit(remote.remote(job))
                continue
            except ray.exceptions.RayError as error:
                yield attempts.outcome(index, path, (False, f"{type(error).__name__}", 0, 0.0))
                submit(actor)
                continue
            if isinstance(result, Exception):
                raise _build_failed(result)
            yield attempts.outcome(index, path, result)
            submit(actor)
    finally:
        if started_here:
            ray.shutdown()
