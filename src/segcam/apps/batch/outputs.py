"""What a batch writes: each input's files on threads, its manifest last, one run per folder.

Per input, into ``out/<input name>/``: one ``<method>.npz`` per method (the whole explanation),
one map file per method, layer and target (PNG overlays for images; volumes in the input's own
format and geometry) named as :mod:`segcam.apps.naming` says, and ``manifest.json`` last: an
input counts as done only once its manifest is there and every file it lists is unaltered. The
folder itself is held by one run at a time (an OS file lock) and records the settings of the
results it holds (``.segcam-run.json``), so results of different settings never mix.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import segcam
from segcam.apps.naming import map_stem, method_file_name
from segcam.apps.specs import file_sha256
from segcam.errors import InputFileError, OutputFileError, SegCamError
from segcam.io.writing import atomic_write, make_dir

try:  # the output folder's lock; without fcntl (Windows) runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "COMMIT_LOCK",
    "LOCK_FILE",
    "RUN_FILE",
    "WRITER_THREADS",
    "MapWriter",
    "OutputFolderError",
    "RunClaim",
    "RunEndedError",
    "check_unchanged",
    "clear_previous",
    "finished",
    "output_folder",
    "remove_if_empty",
    "write_manifest",
    "write_outputs",
]

WRITER_THREADS = 4  # files of one input written at once

MapWriter = Callable[[Path, str, np.ndarray], Path]
"""``write(folder, stem, map) -> path``: one map (on the input's grid) in the input's format."""


def write_outputs(
    explanations: dict[str, segcam.Explanation],
    folder: Path,
    target_names: Sequence[tuple[str, str]],
    grid: tuple[int, ...],
    write_map: MapWriter,
    extra: Sequence[tuple[Callable[..., Path], tuple[Any, ...]]] = (),
    suffix: str = "",
) -> list[Path]:
    """An input's files: ``.npz`` per method, a map per method, layer and target, ``extra``.

    ``target_names`` are each target's (kind, class name) for the map names
    (:mod:`segcam.apps.naming`); ``suffix`` ends every name's stem (``__fold_0``: one fold's
    own maps beside the ensemble's).

    The files are independent: they are compressed and written on a few threads (zlib and the
    tensor-to-bytes copies release the GIL), each through :mod:`segcam.io.writing` (which makes
    the folder). Maps not on ``grid`` (not up-sampled) are in the ``.npz`` only.
    """
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        pending = [pool.submit(function, *arguments) for function, arguments in extra]
        for method, explanation in explanations.items():
            npz = folder / f"{method_file_name(method)}{suffix}.npz"
            pending.append(pool.submit(explanation.save, npz))
            for layer, maps in explanation.layer_maps.items():
                for t, (kind, class_name) in enumerate(target_names):
                    heat = maps[0, t].detach().float().cpu().numpy()
                    if heat.shape == tuple(grid):
                        stem = map_stem(method, layer, t, kind, class_name) + suffix
                        pending.append(pool.submit(write_map, folder, stem, heat))
        return [future.result() for future in pending]


def check_unchanged(path: Path, before: str, after: str, written: list[Path]) -> None:
    """Refuse to record an input that changed while it was explained: its outputs go.

    Raises:
        InputFileError: ``after`` (the input's digest now) is not ``before`` (when it was read).
    """
    if after == before:
        return
    for output in written:
        output.unlink(missing_ok=True)
    raise InputFileError(
        f"{path}: changed while it was explained (SHA-256 {before[:12]}... when read, "
        f"{after[:12]}... after); its outputs were removed: explain it again"
    )


def write_manifest(
    written: list[Path],
    record: dict[str, Any],
    settings: dict[str, Any],
    folder: Path,
    started: float,
    run: RunClaim | None = None,
) -> list[Path]:
    """Write the input's manifest, last: the input counts as done only once it is there.

    With ``run`` (every batch passes its own), the manifest is committed only while that run
    still holds the output folder (:meth:`RunClaim.committing`); otherwise the input's files
    are removed and :class:`RunEndedError` raised: a worker of a run that died never records a
    result in a folder another run now holds.
    """
    manifest = {
        **settings,
        "input": record,
        "outputs": [p.name for p in written],
        "files": {p.name: file_sha256(p) for p in written},
        "seconds": round(time.perf_counter() - started, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if run is None:
        with atomic_write(folder / "manifest.json", "w") as stream:
            json.dump(manifest, stream, indent=1)
        return written
    try:
        with run.committing(), atomic_write(folder / "manifest.json", "w") as stream:
            json.dump(manifest, stream, indent=1)
    except RunEndedError:
        for output in written:
            output.unlink(missing_ok=True)
        remove_if_empty(folder)
        raise
    return written


def finished(folder: Path, digest: str, settings: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a manifest made with these settings of an input of ``digest``.

    And every output it lists is there, unaltered.
    """
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not _is_manifest(saved) or not _same_settings(saved, settings):
        return False
    files = saved["files"]
    if saved["input"].get("sha256") != digest or not files:
        return False
    folder = manifest.parent
    # every output listed is there, unaltered: otherwise the input is done again
    return all(
        (folder / name).is_file() and file_sha256(folder / name) == expected
        for name, expected in files.items()
    )


def clear_previous(folder: Path) -> None:
    """Remove an input's previous outputs (manifest first) and stale temporary files.

    Runs under the output folder's lock, so no other run is writing here. The manifest goes
    first: if this run is killed, the input has no manifest and is done again. Without a
    readable manifest (deleted, damaged), every file named as segcam names its outputs goes,
    so no map of earlier settings stays beside the new ones.
    """
    manifest = folder / "manifest.json"
    listed: list[str] | None = None
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            saved = None
        outputs = saved.get("outputs") if _is_manifest(saved) else None
        if isinstance(outputs, list):
            listed = [str(name) for name in outputs]
        manifest.unlink()
    if listed is None and folder.is_dir():  # no readable list: every file segcam names its way
        listed = [p.name for p in folder.iterdir() if p.is_file() and _written_by_segcam(p.name)]
    for name in listed or []:
        candidate = folder / Path(name).name  # a name, never a path out of the folder
        candidate.unlink(missing_ok=True)
    for stale in folder.glob(".*.part*"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)


def _written_by_segcam(name: str) -> bool:
    """Named as segcam names its outputs.

    A method's ``.npz``, a map (``METHOD__LAYER__tN-...``), the pixel sets' DICOM Segmentation,
    a bundle's ``--save-seg`` segmentation.
    """
    return (
        name.endswith(".npz")
        or name == "pixel_sets.dcm"
        or name.endswith(("_seg.nii.gz", "_seg.png"))
        or re.fullmatch(r"[^.][^/]*__.*__t\d+-.+", name) is not None
    )


RUN_FILE = ".segcam-run.json"
LOCK_FILE = ".segcam.lock"
COMMIT_LOCK = ".segcam.commit.lock"
_FOLDER_FILES = (RUN_FILE, COMMIT_LOCK, LOCK_FILE)  # what a run keeps in the folder itself


class OutputFolderError(SegCamError, RuntimeError):
    """The output folder is in use by another run, or holds results made with other settings."""


class RunEndedError(OutputFolderError):
    """A worker's run no longer holds the output folder: it died, or another run took it."""


@dataclass(frozen=True)
class RunClaim:
    """The run that holds an output folder, as its workers carry it.

    Attributes:
        out: the output folder.
        run_id: the run's id, recorded in ``out/.segcam-run.json`` while it holds the folder.
        parent: in a worker process, the pid of the run's process: the run has ended when the
            worker's parent is another (Linux also kills workers when their parent dies).
    """

    out: Path
    run_id: str
    parent: int | None = None

    def in_worker(self) -> RunClaim:
        """The claim a worker process of this run carries (its parent: this process)."""
        return replace(self, parent=os.getpid())

    def alive(self) -> bool:
        """Whether the run's process is still this worker's parent (always, in the run's own)."""
        return self.parent is None or os.getppid() == self.parent

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Hold the folder's commit lock (shared) while the run id is still this run's.

        A new run writes its run id under the same lock, exclusively: once it has, no manifest
        of an earlier run is committed.

        Raises:
            RunEndedError: the run's process died, or another run holds the folder now.
        """
        if not self.alive():
            raise RunEndedError(f"{self.out}: the run this worker belonged to has ended")
        with _locked(self.out / COMMIT_LOCK, fcntl.LOCK_SH if fcntl is not None else 0):
            if _read_run_file(self.out)[1] != self.run_id:
                raise RunEndedError(f"{self.out} is held by another run now")
            yield


@contextmanager
def _locked(path: Path, operation: int) -> Iterator[None]:
    """``flock`` ``path`` (created if missing) for the block; blocking."""
    try:
        stream = path.open("a+")
    except OSError as error:
        raise OutputFileError(f"cannot create {path}: {error.strerror}") from error
    try:
        if fcntl is not None:
            fcntl.flock(stream.fileno(), operation)
        yield
    finally:
        stream.close()  # closing releases the lock


def _read_run_file(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The settings and run id recorded in ``out/.segcam-run.json`` (None where unreadable)."""
    try:
        recorded = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None, None
    if not isinstance(recorded, dict):
        return None, None
    if isinstance(recorded.get("settings"), dict) and isinstance(recorded.get("run"), dict):
        run_id = recorded["run"].get("id")
        return recorded["settings"], run_id if isinstance(run_id, str) else None
    return recorded, None  # written by segcam before runs had ids: the settings alone


def _same_settings(saved: dict[str, Any], settings: dict[str, Any]) -> bool:
    return all(saved.get(key) == value for key, value in settings.items())


def _leaf_differences(recorded: Any, settings: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """The differing settings as (dotted key, recorded, now), nested dicts opened to the leaf."""
    if isinstance(recorded, dict) and isinstance(settings, dict):
        for key in sorted(set(recorded) | set(settings), key=str):
            if recorded.get(key) != settings.get(key):
                name = f"{path}.{key}" if path else str(key)
                yield from _leaf_differences(recorded.get(key), settings.get(key), name)
    else:
        yield path, recorded, settings


def _differences(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """The first four differing settings, each by its dotted key (``bundle.sha256.models/...``)."""
    now = {k: v for k, v in settings.items()}
    before = {k: recorded.get(k) for k in settings}
    found = list(_leaf_differences(before, now, ""))[:4]
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in found)


def _results(out: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every input folder in ``out`` holding a readable manifest, with the manifest."""
    for folder in sorted(out.iterdir()):
        manifest = folder / "manifest.json"
        if not folder.is_dir() or not manifest.is_file():
            continue
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue  # not a result: its input is done again when it is in a run
        if _is_manifest(saved):
            yield folder, saved


def _is_manifest(saved: Any) -> bool:
    """Whether a manifest's JSON is one segcam wrote: its input, files and settings."""
    return (
        isinstance(saved, dict)
        and isinstance(saved.get("input"), dict)
        and isinstance(saved.get("files"), dict)
        and "segcam" in saved
    )


def remove_if_empty(folder: Path) -> None:
    """Remove an input's folder holding nothing (but temporaries of a killed write)."""
    if not folder.is_dir():
        return
    for stale in folder.glob(".*.part*"):
        stale.unlink(missing_ok=True)
    with suppress(OSError):  # not empty: kept
        folder.rmdir()


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


@contextmanager
def output_folder(
    out: Path,
    settings: dict[str, Any],
    *,
    overwrite: bool,
    say: Callable[[str], None] | None = None,
) -> Iterator[RunClaim]:
    """Hold ``out`` for one run: a lock, one set of settings per folder, the run's id.

    - A second run into the same folder while this one holds it is refused
      (:class:`OutputFolderError`): the lock is an OS file lock on ``out/.segcam.lock``, released
      when the process ends, even when killed.
    - One folder, one setting: a folder holding results (input folders with a manifest) made
      with other settings (targets, methods, layers, model, weights, options, files depended
      on) is refused, so results never mix; ``overwrite`` removes those results, for every
      input in the folder, not only the ones of this run, and says how many. A folder whose
      earlier runs left no result (they failed) takes the new settings without ``overwrite``.
    - ``out/.segcam-run.json`` records the settings and a new run id, written under the commit
      lock; workers commit a manifest only while the id is their run's
      (:meth:`RunClaim.committing`).
    - Temporary files left by killed runs are removed: under the lock none is in flight.
    - A folder this run created and left without results is removed again when it ends.

    Yields:
        The run's claim, for the explainers' manifests.
    """
    tell = say or (lambda line: None)
    created = _missing_ancestor(out)
    make_dir(out)
    try:
        lock = (out / LOCK_FILE).open("a+")
    except OSError as error:
        raise OutputFileError(f"cannot create {out / LOCK_FILE}: {error.strerror}") from error
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputFolderError(
                    f"{out} is being written by another segcam run; wait for it to finish or "
                    f"choose another --out"
                ) from None
        others = [(f, saved) for f, saved in _results(out) if not _same_settings(saved, settings)]
        if others:
            differences = _differences(others[0][1], settings)
            count = f"{len(others)} input{'s' if len(others) > 1 else ''}"
            if not overwrite:
                raise OutputFolderError(
                    f"{out} holds results of {count} made with other settings ({differences}); "
                    f"choose another --out, or --overwrite to replace them"
                )
            for folder, _ in others:
                clear_previous(folder)
                remove_if_empty(folder)
            tell(f"--overwrite: removed the results of {count} made with other settings")
        run_id = uuid.uuid4().hex
        with _locked(out / COMMIT_LOCK, fcntl.LOCK_EX if fcntl is not None else 0):
            run = {
                "id": run_id,
                "pid": os.getpid(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            with atomic_write(out / RUN_FILE, "w") as stream:
                json.dump({"settings": settings, "run": run}, stream, indent=1)
        for stale in [*out.glob(".*.part*"), *out.glob("*/.*.part*")]:
            stale.unlink(missing_ok=True)
        yield RunClaim(out, run_id)
    finally:
        if created is not None and not any(True for _ in _results(out)):
            _remove_folder(out, created)  # made by this run, holding no result: not left behind
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()


def _remove_folder(out: Path, created: Path) -> None:
    """Remove ``out`` (and the folders above it up to ``created``) where they hold nothing else."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.is_dir():
            remove_if_empty(child)
    for name in _FOLDER_FILES:
        (out / name).unlink(missing_ok=True)
    for stale in out.glob(".*.part*"):
        stale.unlink(missing_ok=True)
    for folder in [out, *out.parents]:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): kept
        if folder == created:
            return
