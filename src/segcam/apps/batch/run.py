"""Explain many inputs: checked before any work, one run per output folder, resumable.

:func:`explain_files` expands the inputs through the job's input kind, refuses two inputs that
would write into one folder, checks methods and options, holds the output folder
(:func:`~segcam.apps.batch.outputs.output_folder`), skips inputs whose manifest matches the
job's settings and the input's digest, and runs the rest on a backend
(:mod:`segcam.apps.batch.backends`), reporting one line per input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segcam.apps.batch.backends import Outcome, run_here, run_processes, run_ray
from segcam.apps.batch.job import BatchJob, Progress
from segcam.apps.batch.outputs import finished, output_folder, remove_if_empty
from segcam.apps.naming import printable
from segcam.errors import InputFileError, OptionError
from segcam.methods import get_method, resolve_methods

__all__ = ["BACKENDS", "BatchResult", "explain_files"]

BACKENDS = ("local", "ray")


@dataclass
class BatchResult:
    """What a batch did: inputs done, skipped (already finished) and failed (with the error)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def explain_files(
    inputs: Sequence[Path | str],
    job: BatchJob,
    out: Path | str,
    *,
    backend: str = "local",
    num_workers: int = 1,
    overwrite: bool = False,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    progress: Callable[[str], None] | None = None,
    within: Progress | None = None,
    raise_errors: bool = False,
) -> BatchResult:
    """Explain every input (files or folders) into ``out/<input name>/``.

    Args:
        inputs: files and folders (searched recursively for PNG/JPEG/TIFF, NIfTI, .npy).
        job: what to explain.
        out: the output folder (shared by all workers).
        backend: ``"local"`` or ``"ray"`` (needs the ``ray`` extra).
        num_workers: processes (local) or actors (Ray).
        overwrite: redo inputs that are already finished.
        address: the Ray cluster (``None``: a local one; ``"auto"``; ``"ray://host:port"``).
        gpus_per_worker: GPUs per Ray actor (fractions share a GPU).
        progress: called with one line per input (default: nothing).
        within: called with (done, total) within each input: windows or targets (this process
            only; workers of the other backends do not report within an input).
        raise_errors: in this process, raise an input's error instead of reporting it (the
            command line's one input: its error is the command's).

    Returns:
        The inputs done, skipped and failed.
    """
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise OptionError(f"num_workers must be a positive int; got {num_workers!r}")
    kind = job.kind()
    files = kind.expand([Path(p) for p in inputs], Path(out))
    job = job.for_run()  # the settings taken once: every worker records these
    settings = job.settings()
    names = [kind.name(p) for p in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputFileError(f"several inputs would write to the same folder: {duplicates}")
    for path in files:
        if not path.exists():
            raise InputFileError(f"{path}: no such file")
    resolve_methods(job.methods, job.method_options)
    if job.sliding_window:
        for method in job.methods:
            get_method(method).require_sliding_window()
    out = Path(out)
    say = progress or (lambda line: None)
    with output_folder(out, settings, overwrite=overwrite, say=say) as run:
        todo = []
        result = BatchResult()
        for index, path in enumerate(files, start=1):
            if not overwrite and finished(out / kind.name(path), kind.digest(path), settings):
                say(f"[{index}/{len(files)}] {printable(path)}: already done, skipped")
                result.skipped.append(path)
            else:
                todo.append((index, path))
        if todo:
            if backend == "ray":
                outcomes = run_ray(job, todo, out, num_workers, address, gpus_per_worker, run)
            elif num_workers > 1:  # even one input: a worker's death must not be the run's
                outcomes = run_processes(job, todo, out, min(num_workers, len(todo)), run)
            else:
                outcomes = run_here(job, todo, out, within, run, raise_errors=raise_errors)
            try:
                _report(outcomes, len(files), result, say)
            finally:
                outcomes.close()  # workers stopped before anything is tidied
                for _, path in todo:  # a failed input leaves no empty folder
                    remove_if_empty(out / kind.name(path))
        return result


def _report(
    outcomes: Iterator[Outcome], total: int, result: BatchResult, say: Callable[[str], None]
) -> None:
    for index, path, ok, message, count, seconds, retried in outcomes:
        prefix = f"[{index}/{total}] {printable(path)}"
        again = f" (tried again: the first {retried})" if retried else ""
        if ok:
            result.done.append(path)
            say(f"{prefix}: {count} files in {seconds:.1f}s{again}")
        else:
            result.failed.append((path, message))
            say(f"{prefix}: FAILED: {printable(message)}{again}")
