"""Where a batch's inputs are explained: this process, a pool of processes, or a Ray cluster.

Each backend builds the job once per worker (:meth:`~segcam.apps.batch.job.BatchJob.build`) and
yields one :data:`Outcome` per input as it finishes; one failing input never stops the others.

- this process: :func:`run_here` (``num_workers=1``);
- processes: :func:`run_processes`, ``num_workers`` spawned processes;
- Ray: :func:`run_ray`, an actor pool of ``num_workers`` actors on a Ray cluster (``address``:
  ``None`` starts a local one, ``"auto"`` joins a running one, ``"ray://host:10001"`` a remote
  one), ``gpus_per_worker`` GPUs each. Workers write the outputs, so ``out`` must be on a file
  system every node sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from segcam.apps.batch.job import BatchJob, InputExplainer, Progress
from segcam.errors import SegCamError

__all__ = ["Outcome", "run_here", "run_one", "run_processes", "run_ray"]


class Outcome(NamedTuple):
    """What became of one input."""

    position: int  # among the job's inputs, from 1
    path: Path
    ok: bool
    message: str  # the error, when not ok
    files: int  # files written
    seconds: float


def run_one(
    explainer: InputExplainer, path: Path, out: Path, within: Progress | None = None
) -> tuple[bool, str, int, float]:
    """Explain one input: (ok, error message, files written, seconds); never raises."""
    import time

    started = time.perf_counter()
    try:
        written = explainer.explain(path, out, within)
    except SegCamError as error:
        return False, str(error), 0, time.perf_counter() - started
    except Exception as error:  # any failure of one input is reported; the others go on
        message = f"{type(error).__name__}: {error}"
        return False, message, 0, time.perf_counter() - started
    return True, "", len(written), time.perf_counter() - started


def run_here(
    job: BatchJob,
    todo: list[tuple[int, Path]],
    out: Path,
    within: Progress | None,
    *,
    raise_errors: bool = False,
) -> Iterator[Outcome]:
    """In this process: the job built once, the inputs in order.

    With ``raise_errors`` an input's error is raised, not reported (a single input's error is
    the command's).
    """
    import time

    explainer = job.build()
    for index, path in todo:
        if raise_errors:
            started = time.perf_counter()
            written = explainer.explain(path, out, within)
            yield Outcome(index, path, True, "", len(written), time.perf_counter() - started)
        else:
            yield Outcome(index, path, *run_one(explainer, path, out, within))


_WORKER: InputExplainer | None = None


def _init_worker(job: BatchJob) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = job.build()


def _work(path: str, out: str) -> tuple[bool, str, int, float]:
    assert _WORKER is not None
    return run_one(_WORKER, Path(path), Path(out))


def run_processes(
    job: BatchJob, todo: list[tuple[int, Path]], out: Path, workers: int
) -> Iterator[Outcome]:
    """``workers`` spawned processes, each building the job once; a dead worker is reported."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(job,)
    ) as pool:
        futures = {pool.submit(_work, str(path), str(out)): (index, path) for index, path in todo}
        for future in as_completed(futures):
            index, path = futures[future]
            try:
                ok, message, count, seconds = future.result()
            except Exception as error:  # a worker that died: reported, the others go on
                ok, message, count, seconds = False, f"worker failed: {error}", 0, 0.0
            yield Outcome(index, path, ok, message, count, seconds)


def run_ray(
    job: BatchJob,
    todo: list[tuple[int, Path]],
    out: Path,
    workers: int,
    address: str | None,
    gpus: float,
) -> Iterator[Outcome]:
    """A pool of Ray actors (restarted twice at most), ``gpus`` GPUs each."""
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
    try:

        @ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=2)
        class Worker:
            def __init__(self, spec: BatchJob) -> None:
                torch.set_num_threads(1)
                self.job = spec.build()

            def run(self, index: int, path: str, where: str) -> Outcome:
                return Outcome(index, Path(path), *run_one(self.job, Path(path), Path(where)))

        remote: Any = Worker
        actors = [remote.remote(job) for _ in range(min(workers, len(todo)))]
        queue = list(todo)
        running: dict[Any, tuple[Any, int, Path]] = {}

        def submit(actor: Any) -> None:
            if queue:
                index, path = queue.pop(0)
                running[actor.run.remote(index, str(path), str(out))] = (actor, index, path)

        for actor in actors:
            submit(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, index, path = running.pop(ref)
            try:
                outcome: Outcome = ray.get(ref)
            except ray.exceptions.RayError as error:  # failed even after its retries
                outcome = Outcome(
                    index, path, False, f"worker failed: {type(error).__name__}", 0, 0.0
                )
            yield outcome
            submit(actor)
    finally:
        if started_here:
            ray.shutdown()
