"""Cases and files as ``nnUNetv2_predict`` sees them: channel files grouped, outputs in geometry.

A raw case is ``CASE_XXXX<file_ending>`` with one file per input channel (``_0000``,
``_0001``, ...). Maps are written in the case's own format with its geometry, as nnU-Net writes
its segmentation, but as float32; the segmentation is written by nnU-Net's own writer. Every
file is written under a temporary name beside its destination and renamed.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcam.io.writing import atomic_path
from segcam.nnunet.model import NnUNetError

__all__ = [
    "case_id",
    "channel_files",
    "group_cases",
    "reverses_axes",
    "write_map",
    "write_segmentation",
]

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _split(path: Path, file_ending: str) -> tuple[str, int] | None:
    name = path.name
    if not name.endswith(file_ending):
        return None
    match = _CHANNEL.match(name[: -len(file_ending)])
    if match is None:
        return None
    return match["case"], int(match["channel"])


def case_id(path: Path, file_ending: str) -> str:
    """The case identifier of a channel file (``liver_3_0000.nii.gz`` -> ``liver_3``)."""
    split = _split(path, file_ending)
    if split is None:
        raise NnUNetError(
            f"{path.name}: not a channel file of a case (CASE_XXXX{file_ending}, e.g. "
            f"case_0000{file_ending})"
        )
    return split[0]


def channel_files(first: Path, file_ending: str, channels: int) -> list[Path]:
    """All channel files of the case whose ``_0000`` file is ``first``, in channel order."""
    case = case_id(first, file_ending)
    files = [first.parent / f"{case}_{c:04d}{file_ending}" for c in range(channels)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise NnUNetError(
            f"case {case}: missing channel file(s) {', '.join(missing)} (the model takes "
            f"{channels} channel(s))"
        )
    return files


def group_cases(inputs: Sequence[Path], file_ending: str, channels: int) -> list[Path]:
    """Cases (each as its ``_0000`` file) from folders of raw cases and from case files.

    As ``nnUNetv2_predict -i``: a folder's files ending in ``file_ending`` are grouped by case
    id (not recursively); files given directly are grouped the same way. Each case must have
    exactly the channels ``_0000`` .. ``_{channels-1:04d}``.

    Raises:
        NnUNetError: a file that is not a channel file, an empty folder, a case with missing or
            extra channels.
    """
    found: dict[Path, dict[str, set[int]]] = {}
    for path in inputs:
        if path.is_dir():
            members = sorted(
                p for p in path.iterdir() if p.is_file() and _split(p, file_ending) is not None
            )
            if not members:
                raise NnUNetError(
                    f"{path}: no case files (CASE_XXXX{file_ending}) inside; the model reads "
                    f"{file_ending} files"
                )
        elif not path.exists():
            raise NnUNetError(f"{path}: no such file or folder")
        else:
            if _split(path, file_ending) is None:
                case_id(path, file_ending)  # raises with the reason
            members = [path]
        for member in members:
            split = _split(member, file_ending)
            assert split is not None
            found.setdefault(member.parent, {}).setdefault(split[0], set()).add(split[1])
    cases = []
    for folder, by_case in found.items():
        for case, present in sorted(by_case.items()):
            extra = sorted(c for c in present if c >= channels)
            if extra:
                raise NnUNetError(
                    f"case {case}: channel file(s) {extra} beyond the model's {channels} channel(s)"
                )
            first = folder / f"{case}_0000{file_ending}"
            channel_files(first, file_ending, channels)  # raises for a missing channel
            cases.append(first)
    return cases


def reverses_axes(reader_name: str) -> bool:
    """Whether the reader returns 3D arrays as (k, j, i): SimpleITK's and nibabel's readers do."""
    return reader_name in {
        "SimpleITKIO",
        "SimpleITKIOWithReorient",
        "NibabelIO",
        "NibabelIOWithReorient",
    }


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    with atomic_path(path) as temporary:
        write(str(temporary))
    return path


def write_map(path: Path, volume: np.ndarray, reader_name: str, properties: dict[str, Any]) -> Path:
    """Write a float32 map on the original grid with the case's geometry, atomically.

    ``volume`` is in the reader's array order (as the maps of :func:`segcam.nnunet.explain`);
    SimpleITK readers get spacing, origin and direction, nibabel readers the original affine,
    exactly as their ``write_seg`` writes nnU-Net's segmentation. Other readers get ``.npy``.
    """
    data = np.asarray(volume, dtype=np.float32)
    if reader_name in ("SimpleITKIO", "SimpleITKIOWithReorient"):
        sitk: Any = importlib.import_module("SimpleITK")
        stuff = properties["sitk_stuff"]

        def write(name: str) -> None:
            array = data[0] if len(stuff["spacing"]) == 2 else data
            image = sitk.GetImageFromArray(np.ascontiguousarray(array))
            image.SetSpacing(stuff["spacing"])
            image.SetOrigin(stuff["origin"])
            image.SetDirection(stuff["direction"])
            if reader_name == "SimpleITKIOWithReorient":
                image = sitk.DICOMOrient(image, stuff["original_orientation"])
            sitk.WriteImage(image, name, True)

        return _atomic(path, write)
    if reader_name in ("NibabelIO", "NibabelIOWithReorient"):
        nibabel: Any = importlib.import_module("nibabel")
        orientations: Any = importlib.import_module("nibabel.orientations")
        stuff = properties["nibabel_stuff"]

        def write_nifti(name: str) -> None:
            array = np.ascontiguousarray(data.transpose((2, 1, 0)))
            if reader_name == "NibabelIO":
                image = nibabel.Nifti1Image(array, affine=stuff["original_affine"])
            else:
                image = nibabel.Nifti1Image(array, affine=stuff["reoriented_affine"])
                back = orientations.ornt_transform(
                    orientations.axcodes2ornt("RAS"),
                    orientations.io_orientation(stuff["original_affine"]),
                )
                image = image.as_reoriented(back)
            nibabel.save(image, name)

        return _atomic(path, write_nifti)
    npy = path.with_name(path.name.split(".")[0] + ".npy")
    return _atomic(npy, lambda name: np.save(name, data))


def write_segmentation(
    path: Path, segmentation: np.ndarray, writer: Any, properties: dict[str, Any]
) -> Path:
    """nnU-Net's exported segmentation, written by nnU-Net's own writer (atomically)."""
    return _atomic(path, lambda name: writer.write_seg(segmentation, name, properties))
