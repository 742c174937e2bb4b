"""The kinds of input a batch explains: plain files here, nnU-Net cases beside it.

An input kind (:class:`~segcam.apps.batch.job.InputKind`) finds a job's inputs among the given
paths, names each one's output folder, digests it (what a rerun compares), adds its own settings
to the manifest, and builds, once per worker, the explainer that explains one input and writes
its files. The batch (:mod:`segcam.apps.batch.run`) knows nothing else about them: a new kind of
input is a class implementing the protocol, registered with
:func:`~segcam.apps.batch.job.register_input_kind`, not a branch there.

Plain files (:class:`FileInputs`): PNG/JPEG/TIFF, NIfTI, NRRD, MetaImage, DICOM series and
``.npy``, explained whole or window by window; maps in the input's own geometry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcam
from segcam.apps.batch.job import BatchJob, Progress, register_input_kind
from segcam.apps.batch.outputs import (
    RunClaim,
    check_unchanged,
    clear_previous,
    write_manifest,
    write_outputs,
)
from segcam.apps.naming import folder_name, spec_class_name
from segcam.apps.specs import (
    apply_intensity,
    check_mask_geometry,
    file_sha256,
    load_callable,
    load_model,
    mask_file,
    mask_geometry,
    parse_target,
)
from segcam.errors import InputFileError, OptionError
from segcam.io.files import IMAGE_SUFFIXES, NIFTI_SUFFIXES, InputFile, read_input, write_nifti
from segcam.io.medical import MAP_FORMATS, MEDICAL_SUFFIXES, is_dicom_folder, write_like
from segcam.io.writing import atomic_write
from segcam.layers import resolve_layers
from segcam.outputs import FromProbabilities

__all__ = [
    "SUPPORTED",
    "FileInputs",
    "expand_inputs",
    "explain_options",
    "output_name",
    "pixel_set_writer",
    "resolve_map_format",
    "write_overlay_png",
    "write_volume_map",
]

SUPPORTED = (*IMAGE_SUFFIXES, *NIFTI_SUFFIXES, *MEDICAL_SUFFIXES, ".npy")


def explain_options(explain: dict[str, Any]) -> dict[str, Any]:
    """The job's explain options as keyword arguments of ``segcam.explain_methods``."""
    options = dict(explain)
    if options.pop("logits_from", "logits") == "probabilities":
        options["output"] = FromProbabilities(options.get("output"))
    return options


def expand_inputs(inputs: Sequence[Path], exclude: Path | None = None) -> list[Path]:
    """Files, and the supported files inside folders (recursively, sorted).

    A folder holding DICOM files is one input (a series), not one input per slice. Files under
    ``exclude`` (the output folder, when it lies inside an input folder) are left out, so a rerun
    never reads its own outputs as inputs.
    """
    skip = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for path in inputs:
        if skip is not None and path.is_dir() and path.resolve() == skip:
            raise InputFileError(
                f"{path} is the output folder (--out) as well as an input; choose another --out"
            )
        if path.is_dir() and not is_dicom_folder(path):
            found = []
            for folder, names, filenames in os.walk(path):
                here = Path(folder)
                names[:] = sorted(n for n in names if not n.startswith("."))
                if skip is not None and here.resolve().is_relative_to(skip):
                    names[:] = []
                    continue
                if is_dicom_folder(here) and here != path:
                    found.append(here)
                    names[:] = []
                    continue
                found.extend(
                    here / name
                    for name in filenames
                    if name.lower().endswith(SUPPORTED)
                    and not name.lower().endswith(".dcm")
                    and not name.startswith(".")
                )
            if not found:
                raise InputFileError(
                    f"{path}: no supported files (PNG/JPEG/TIFF, NIfTI, NRRD, MetaImage, DICOM "
                    f"series, .npy) inside"
                )
            files.extend(sorted(found))
        else:
            files.append(path)
    return files


def output_name(path: Path) -> str:
    """The output folder name of an input: its file name without the suffix, made safe.

    Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``, and a name that
    is empty or starts with a dot gets a leading ``_``: the folder always lies inside ``--out``.
    """
    name = path.name
    for suffix in (".nii.gz", *SUPPORTED):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.name if path.is_dir() else path.stem
    return folder_name(name)


@dataclass(frozen=True)
class FileInputs:
    """Plain files: images, volumes with their geometry, arrays."""

    def expand(self, inputs: Sequence[Path], exclude: Path | None) -> list[Path]:  # noqa: D102
        return expand_inputs(inputs, exclude=exclude)

    def name(self, path: Path) -> str:  # noqa: D102
        return output_name(path)

    def digest(self, path: Path) -> str:  # noqa: D102
        return file_sha256(path)

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {}

    def build(self, job: BatchJob) -> FileExplainer:  # noqa: D102
        model = load_model(
            job.model,
            Path(job.weights) if job.weights else None,
            job.model_kwargs,
            trust_pickle=job.trust_pickle,
            weights_key=job.weights_key,
        )
        resolve_layers(model, list(job.layers))  # a misspelt layer: the run's error, once
        device = torch.device(job.device)
        model.to(device)
        targets = [parse_target(spec, list(job.classes)) for spec in job.targets]
        return FileExplainer(
            job=job,
            model=model,
            targets=targets,
            device=device,
            preprocess=load_callable(job.preprocess, "--preprocess") if job.preprocess else None,
            settings=job.settings(),
            mask_geometries=_mask_geometries(job.targets),
        )


def _mask_geometries(specs: Sequence[str]) -> dict[str, tuple[str, np.ndarray] | None]:
    """Where each mask or region file's voxels lie, checked against every input's."""
    files = {spec: mask_file(spec) for spec in specs}
    return {spec: mask_geometry(read_input(path)) for spec, path in files.items() if path}


@dataclass
class FileExplainer:
    """A loaded model and parsed targets: explains one file and writes its outputs."""

    job: BatchJob
    model: torch.nn.Module
    targets: list[segcam.Target]
    device: torch.device
    preprocess: Any
    settings: dict[str, Any]
    mask_geometries: dict[str, tuple[str, np.ndarray] | None]

    def explain(
        self,
        path: Path,
        out: Path,
        progress: Progress | None = None,
        run: RunClaim | None = None,
    ) -> list[Path]:
        """Explain ``path`` and write its files: :meth:`prepare`, then its write step."""
        return self.prepare(path, out, progress, run)()

    def prepare(
        self,
        path: Path,
        out: Path,
        progress: Progress | None = None,
        run: RunClaim | None = None,
    ) -> Callable[[], list[Path]]:
        """Read and explain (whole or by windows); return the step writing its files."""
        started = time.perf_counter()
        job = self.job
        before = file_sha256(path)  # the digest of what is read, checked again at the end
        data: InputFile = read_input(path, series_uid=job.series_uid)
        for spec, geometry in self.mask_geometries.items():
            check_mask_geometry(spec, geometry, data)
        # before the compute: a format the input cannot take is its error, at once
        map_format = resolve_map_format(data, job.map_format) if data.spatial_dims == 3 else ""
        array = apply_intensity(data.array, preprocess=self.preprocess, **job.intensity)
        x = torch.from_numpy(array)[None].to(self.device)
        folder = out / output_name(path)
        clear_previous(folder)
        method_options = {m: job.method_options[m] for m in job.methods if m in job.method_options}
        common = {
            **explain_options(job.explain),
            "method_options": method_options,
            "progress": progress,
        }
        if job.sliding_window:  # every method from each window's one forward and backward passes
            explanations = segcam.explain_sliding_window_methods(
                self.model, x, self.targets, list(job.layers), methods=list(job.methods),
                **job.sliding_window, **common,
            )  # fmt: skip
        else:  # every method from one forward and one backward pass per target
            explanations = segcam.explain_methods(
                self.model, x, self.targets, list(job.layers), list(job.methods), **common
            )

        def write_map(where: Path, stem: str, heat: np.ndarray) -> Path:
            if data.spatial_dims == 2:
                return write_overlay_png(where / f"{stem}.png", array.mean(axis=0), heat)
            return write_volume_map(where, stem, heat, data, map_format)

        names = [spec_class_name(spec, job.classes) for spec in job.targets]
        extra = []
        if map_format == "dicom":  # the pixel sets as a Segmentation beside the maps
            segmentation = pixel_set_writer(explanations, names, data, folder)
            extra = [segmentation] if segmentation is not None else []

        def finish() -> list[Path]:
            # the input's files, compressed and written (the manifest last); the caller
            # may run it while the next input computes
            written = write_outputs(
                explanations, folder, names, tuple(array.shape[1:]), write_map, extra
            )
            check_unchanged(path, before, file_sha256(path), written)
            record = {
                "path": str(path),
                "sha256": before,
                "shape": list(array.shape),
                **({"map_format": map_format} if data.spatial_dims == 3 else {}),
            }
            return write_manifest(written, record, self.settings, folder, started, run)

        return finish


def write_overlay_png(path: Path, image: np.ndarray, heat: np.ndarray) -> Path:
    """A 2D map over its image (grey, the map in colour) as a PNG, atomically."""
    from PIL import Image

    from segcam.viz import overlay

    with atomic_write(path) as stream:
        Image.fromarray(overlay(image, heat)).save(stream, format="PNG")
    return path


def resolve_map_format(data: InputFile, chosen: str) -> str:
    """The format a 3D map of ``data`` is written in: ``--map-format``, or the input's own.

    ``auto`` is the input's own format: NIfTI, NRRD, MetaImage, and for a DICOM series a DICOM
    Parametric Map referencing it (NIfTI when the series cannot be referenced: no Frame of
    Reference, a single slice).

    Raises:
        OptionError: a format the input cannot take (``nrrd`` for a NIfTI input, ``dicom`` for a
            file that is no DICOM series).
    """
    from segcam.io.dicom_maps import dicom_refusal

    medical = data.medical
    if chosen == "dicom" and (medical is None or medical.format != "dicom"):
        raise OptionError("--map-format dicom needs a DICOM series input")
    if medical is None:
        if chosen in ("auto", "nifti"):
            return "nifti"
        raise OptionError(f"--map-format {chosen} needs a DICOM, NRRD or MetaImage input")
    if chosen == "dicom":
        reason = dicom_refusal(medical)
        if reason is not None:
            raise OptionError(f"--map-format dicom: {reason}; write NIfTI (--map-format nifti)")
    if chosen != "auto":
        return chosen
    if medical.format == "dicom":
        return "dicom" if dicom_refusal(medical) is None else "nifti"
    return medical.format


def write_volume_map(
    folder: Path, stem: str, heat: np.ndarray, data: InputFile, chosen: str
) -> Path:
    """A 3D map in the input's geometry, in :func:`resolve_map_format`'s format.

    NIfTI inputs keep their affine and header (nibabel); NRRD and MetaImage inputs (and DICOM
    ones written as NIfTI) keep their spacing, origin and direction (SimpleITK); DICOM maps are
    Parametric Maps referencing the series (:mod:`segcam.io.dicom_maps`).
    """
    chosen = resolve_map_format(data, chosen) if chosen == "auto" else chosen
    if data.medical is not None and chosen == "dicom":
        from segcam.io.dicom_maps import write_parametric_map

        description = "segcam " + stem.replace("__", " ")
        return write_parametric_map(
            folder / f"{stem}.dcm", heat, data.medical, description=description
        )
    if data.medical is not None:
        return write_like(folder / f"{stem}{MAP_FORMATS[chosen]}", heat, data.medical)
    affine = data.nifti_affine if data.nifti_affine is not None else np.eye(4)
    if chosen == "nifti":
        return write_nifti(
            folder / f"{stem}.nii.gz", heat, affine, data.nifti_header, description=f"segcam {stem}"
        )
    raise OptionError(f"--map-format {chosen} needs a DICOM, NRRD or MetaImage input")


def pixel_set_writer(
    explanations: dict[str, segcam.Explanation],
    names: Sequence[tuple[str, str]],
    data: InputFile,
    folder: Path,
) -> tuple[Any, tuple[Any, ...]] | None:
    """The DICOM Segmentation of the targets' non-empty pixel sets, as an extra write (or None)."""
    from segcam.io.dicom_maps import PixelSet, write_segmentation

    first = next(iter(explanations.values()))
    sets = [
        PixelSet(
            f"t{t} {kind} {name}",
            first.pixel_sets[0, t].cpu().numpy(),
            kind in ("predicted", "probability", "region"),
        )
        for t, (kind, name) in enumerate(names)
    ]
    if not any(bool(item.mask.any()) for item in sets):
        return None  # a Segmentation needs a segment
    return write_segmentation, (folder / "pixel_sets.dcm", sets, data.medical)


register_input_kind("files", lambda job: FileInputs())
