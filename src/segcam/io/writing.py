"""segcam's one file writer: every output appears complete or not at all.

Every format segcam writes (``.npz`` and ``.safetensors`` explanations, NIfTI, NRRD and MetaImage
maps, PNG overlays, nnU-Net's segmentations, JSON manifests and reports) goes through
:func:`atomic_path` or :func:`atomic_write`:

1. the destination's folder is created (with its parents);
2. the data go to a temporary file of a name unique to this write (``.NAME.XXXXXXXX.part`` plus
   the destination's suffix, so writers that pick the format from the name still do), in the
   destination's folder, so the rename below never crosses a file system;
3. the file gets the mode the process's umask allows (``mkstemp`` makes it 0600), its data are
   flushed to the disk (``fsync``), and it is renamed over the destination.

Each step sits inside one ``try``: any failure (a missing or read-only folder, a full disk, a
writer's own error) removes the temporary file and raises
:class:`~segcam.errors.OutputFileError` naming the destination, and a kill leaves at most a
hidden ``.*.part*`` file, which the batch removes before it writes into that folder again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from segcam.errors import OutputFileError, SegCamError

__all__ = ["atomic_path", "atomic_write", "file_mode", "make_dir"]

# The umask, read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


_TEMPORARY_NAME = 200  # bytes of the destination's name kept in its temporary's


def _cut(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes of UTF-8, never inside a character."""
    return name.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "ignore")


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0o644 under umask 022)."""
    return 0o666 & ~_UMASK


def make_dir(path: Path) -> Path:
    """Create a folder (and its parents) for outputs; :class:`OutputFileError` names the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFileError(
            f"cannot create the output folder {path}: {error.strerror or error}"
        ) from error
    return path


def _suffix(path: Path) -> str:
    """The suffix a format is recognised by: ``.nii.gz`` whole, else the last one."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s data to; renamed over ``path`` when the block ends.

    For writers that take a file name (SimpleITK, nibabel, nnU-Net's own writers). The temporary
    file exists (empty) when the block starts and carries ``path``'s suffix.

    Raises:
        OutputFileError: the folder cannot be made, the file cannot be written or renamed, or
            the writer raised an ``OSError`` or ``RuntimeError`` (ITK's error type); any other
            exception passes unchanged. In every case the temporary file is gone.
    """
    destination = Path(path)
    temporary: Path | None = None
    try:
        make_dir(destination.parent)
        handle, name = tempfile.mkstemp(  # the name cut: the temporary fits where the file does
            prefix=f".{_cut(destination.name, _TEMPORARY_NAME)}.",
            suffix=f".part{_suffix(destination)}",
            dir=destination.parent,
        )
        os.close(handle)
        temporary = Path(name)
        yield temporary
        os.chmod(temporary, file_mode())
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, destination)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError | RuntimeError) and not isinstance(error, SegCamError):
            raise OutputFileError(f"cannot write {destination}: {_reason(error)}") from error
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: Literal["wb", "w"] = "wb"
) -> Iterator[IO[Any]]:
    """An open stream to write ``path``'s data to; the file appears complete or not at all.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, UTF-8 whatever the locale). Errors as
    :func:`atomic_path` (which syncs the data once the stream is closed).
    """
    with atomic_path(path) as temporary:
        encoding = None if mode == "wb" else "utf-8"
        with open(temporary, mode, encoding=encoding) as stream:
            yield stream
