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
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
    "LOCK_FILE",
    "RUN_FILE",
    "WRITER_THREADS",
    "MapWriter",
    "OutputFolderError",
    "check_unchanged",
    "clear_previous",
    "finished",
    "output_folder",
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
) -> list[Path]:
    """An input's files: ``.npz`` per method, a map per method, layer and target, ``extra``.

    ``target_names`` are each target's (kind, class name) for the map names
    (:mod:`segcam.apps.naming`).

    The files are independent: they are compressed and written on a few threads (zlib and the
    tensor-to-bytes copies release the GIL), each through :mod:`segcam.io.writing` (which makes
    the folder). Maps not on ``grid`` (not up-sampled) are in the ``.npz`` only.
    """
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        pending = [pool.submit(function, *arguments) for function, arguments in extra]
        for method, explanation in explanations.items():
            npz = folder / f"{method_file_name(method)}.npz"
            pending.append(pool.submit(explanation.save, npz))
            for layer, maps in explanation.layer_maps.items():
                for t, (kind, class_name) in enumerate(target_names):
                    heat = maps[0, t].detach().float().cpu().numpy()
                    if heat.shape == tuple(grid):
                        stem = map_stem(method, layer, t, kind, class_name)
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
) -> list[Path]:
    """Write the input's manifest, last: the input counts as done only once it is there."""
    manifest = {
        **settings,
        "input": record,
        "outputs": [p.name for p in written],
        "files": {p.name: file_sha256(p) for p in written},
        "seconds": round(time.perf_counter() - started, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_write(folder / "manifest.json", "w") as stream:
        json.dump(manifest, stream, indent=1)
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
    except (OSError, json.JSONDecodeError):
        return False
    same = all(saved.get(key) == value for key, value in settings.items())
    if not same or saved.get("input", {}).get("sha256") != digest:
        return False
    files = saved.get("files")
    if not isinstance(files, dict) or not files:
        return False
    folder = manifest.parent
    # every output listed is there, unaltered: otherwise the input is done again
    return all(
        (folder / name).is_file() and file_sha256(folder / name) == digest
        for name, digest in files.items()
    )


def clear_previous(folder: Path) -> None:
    """Remove an input's previous outputs (manifest first) and stale temporary files.

    Runs under the output folder's lock, so no other run is writing here. The manifest goes
    first: if this run is killed, the input has no manifest and is done again.
    """
    manifest = folder / "manifest.json"
    listed: list[str] = []
    if manifest.is_file():
        try:
            listed = list(json.loads(manifest.read_text(encoding="utf-8")).get("outputs", []))
        except (OSError, json.JSONDecodeError, AttributeError):
            listed = []
        manifest.unlink()
    for name in listed:
        candidate = folder / Path(str(name)).name  # a name, never a path out of the folder
        candidate.unlink(missing_ok=True)
    for stale in folder.glob(".*.part*"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)


RUN_FILE = ".segcam-run.json"
LOCK_FILE = ".segcam.lock"


class OutputFolderError(SegCamError, RuntimeError):
    """The output folder is in use by another run, or holds results made with other settings."""


def _differences(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    keys = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
    return "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in keys[:4])


@contextmanager
def output_folder(out: Path, settings: dict[str, Any], *, overwrite: bool) -> Iterator[None]:
    """Hold ``out`` for one run: a lock, and one set of settings per folder.

    - A second run into the same folder while this one holds it is refused
      (:class:`OutputFolderError`): the lock is an OS file lock on ``out/.segcam.lock``, released
      when the process ends, even when killed.
    - ``out/.segcam-run.json`` records the settings of the results in the folder. A run with
      other settings (targets, methods, layers, model, weights, options) is refused, so results
      of different settings never overwrite or mix with each other; ``overwrite`` replaces them
      (each input's previous files are removed before its new ones are written).
    - Temporary files left by killed runs are removed: under the lock none is in flight.
    """
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
        run_file = out / RUN_FILE
        recorded: dict[str, Any] | None = None
        if run_file.is_file():
            try:
                recorded = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                recorded = None
        if recorded is not None and recorded != settings and not overwrite:
            differences = _differences(recorded, settings)
            raise OutputFolderError(
                f"{out} holds results made with other settings ({differences}); choose another "
                f"--out, or --overwrite to replace them"
            )
        if recorded != settings:
            with atomic_write(run_file, "w") as stream:
                json.dump(settings, stream, indent=1)
        for stale in [*out.glob(".*.part*"), *out.glob("*/.*.part*")]:
            stale.unlink(missing_ok=True)
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()
