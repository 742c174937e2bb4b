"""The batch's MONAI bundle input kind: images explained through a bundle's own pipeline.

A batch job with a ``bundle`` spec (``segcam explain --bundle FOLDER``) takes the image files the
bundle's ``LoadImaged`` reads (NIfTI for the Model Zoo's CT and MR bundles) and explains each
with :func:`segcam.monai.explain_and_predict`: the bundle's preprocessing, its inferer's windows,
the score on the logits brought back by its ``Invertd``. Per image, into ``out/<name>/``:

- ``<method>.npz``: the explanation (maps, the inverted logits and the pixel sets on the
  original grid);
- ``<method>__<layer>__t<i>-<kind>-<class>.nii.gz`` (or the input's own format): one float32
  map per target and layer, in the input's geometry;
- ``<name>_seg.nii.gz`` with ``save_seg``: the bundle's own segmentation (its postprocessing,
  writers left out), as labels;
- ``manifest.json`` last.

Targets use the original image's voxel order (the array order of MONAI's reader, which for NIfTI
is the file's (i, j, k)); classes by index or by the names in the bundle's ``metadata.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcam.apps.batch.inputs import (
    expand_inputs,
    explain_options,
    output_name,
    resolve_map_format,
    write_overlay_png,
    write_volume_map,
)
from segcam.apps.batch.job import BatchJob, Progress, register_input_kind
from segcam.apps.batch.outputs import (
    RunClaim,
    check_unchanged,
    clear_previous,
    write_manifest,
    write_outputs,
)
from segcam.apps.naming import spec_class_name
from segcam.apps.specs import (
    check_mask_geometry,
    file_sha256,
    mask_file,
    mask_geometry,
    parse_target,
)
from segcam.errors import InputFileError
from segcam.io.files import InputFile, read_input, write_nifti
from segcam.io.medical import ras_affine
from segcam.monai.pipeline import export_of, read_original
from segcam.targets import Target

__all__ = ["BundleImageJob", "BundleInputs", "bundle_classes", "bundle_settings"]

BUNDLE_FILES = ("configs/inference.json", "configs/inference.yaml", "configs/metadata.json")


def bundle_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the manifest records it: SHA-256 of the configs and the checkpoint."""
    folder = Path(spec["folder"])
    checkpoint = spec.get("checkpoint", "models/model.pt")
    return {
        **spec,
        "folder": str(folder),
        "sha256": {
            name: file_sha256(folder / name)
            for name in (*BUNDLE_FILES, checkpoint)
            if (folder / name).is_file()
        },
    }


def bundle_classes(folder: str | Path) -> tuple[str, ...]:
    """The bundle's class names (``metadata.json``'s ``channel_def``), read without MONAI."""
    import json

    from segcam.monai import MonaiBundle

    path = Path(folder) / "configs" / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return ()
    holder = MonaiBundle(folder=Path(folder), network=torch.nn.Identity(), metadata=metadata)
    return holder.class_names


@dataclass(frozen=True)
class BundleInputs:
    """Image files explained through a MONAI bundle's pipeline (an input kind)."""

    spec: dict[str, Any]

    def expand(self, inputs: Sequence[Path], exclude: Path | None) -> list[Path]:  # noqa: D102
        return expand_inputs(inputs, exclude=exclude)

    def name(self, path: Path) -> str:  # noqa: D102
        return output_name(path)

    def digest(self, path: Path) -> str:  # noqa: D102
        return file_sha256(path)

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {"bundle": bundle_settings(self.spec)}

    def build(self, job: BatchJob) -> BundleImageJob:  # noqa: D102
        from segcam.layers import resolve_layers
        from segcam.monai import load_bundle

        bundle = load_bundle(
            self.spec["folder"],
            checkpoint=self.spec.get("checkpoint", "models/model.pt"),
            device=torch.device(job.device),
        )
        resolve_layers(bundle.network, list(job.layers))  # a misspelt layer: once, before any
        masks = {spec: mask_file(spec) for spec in job.targets}
        return BundleImageJob(
            job=job,
            spec=dict(self.spec),
            bundle=bundle,
            targets=[parse_target(s, list(job.classes)) for s in job.targets],
            settings=job.settings(),
            mask_geometries={
                spec: mask_geometry(read_input(path)) for spec, path in masks.items() if path
            },
        )


def _same_grid(data: InputFile, shape: tuple[int, ...], affine: Any) -> bool:
    """Whether segcam's reading of the input lies on the grid MONAI's reader gave the bundle."""
    if tuple(data.array.shape[1:]) != tuple(shape) or affine is None:
        return False
    own = data.nifti_affine if data.nifti_affine is not None else None
    if own is None and data.medical is not None:
        own = ras_affine(data.medical)
    if own is None:
        return False
    return bool(np.allclose(np.asarray(own, float), np.asarray(affine, float), atol=1e-4))


def _segmentation_writer(
    prediction: Any, folder: Path, name: str, affine: np.ndarray, flip: bool = False
) -> tuple[Callable[..., Path], tuple[Any, ...]]:
    """The bundle's own segmentation: labels (float32, as its SaveImaged), or its channels.

    A multi-label output (a channel per class, overlapping) is written as it is, channels last
    (as SaveImaged writes a multi-channel prediction); a 2D one as a PNG of labels.
    """
    output = prediction.output.cpu().numpy()
    if output.ndim == 3:  # (channels, rows, columns)
        labels = prediction.labels.cpu().numpy().astype(np.uint8)
        return _write_label_png, (folder / f"{name}_seg.png", labels.T if flip else labels)
    if prediction.multi_label:
        values = np.moveaxis(output, 0, -1).astype(np.float32)
    else:
        values = prediction.labels.cpu().numpy().astype(np.float32)
    return write_nifti, (folder / f"{name}_seg.nii.gz", values, affine, None)


def _write_label_png(path: Path, labels: np.ndarray) -> Path:
    from PIL import Image

    from segcam.io.writing import atomic_write

    with atomic_write(path) as stream:
        Image.fromarray(labels).save(stream, format="PNG")
    return path


@dataclass
class BundleImageJob:
    """A loaded bundle and parsed targets: explains one image and writes its outputs."""

    job: BatchJob
    spec: dict[str, Any]
    bundle: Any  # a segcam.monai.MonaiBundle
    targets: list[Target]
    settings: dict[str, Any]
    mask_geometries: dict[str, Any]

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
        """Explain one image through the bundle; return the step writing its files."""
        from segcam import monai

        started = time.perf_counter()
        job, bundle = self.job, self.bundle
        before = file_sha256(path)  # what is read, checked again at the end
        folder = out / output_name(path)
        clear_previous(folder)
        case = monai.read_case(bundle, path)
        data = read_input(path, series_uid=job.series_uid)
        for spec, geometry in self.mask_geometries.items():
            check_mask_geometry(spec, geometry, data)
        grid = export_of(bundle, case).grid(case)  # the original image's (preprocessed: no Invertd)
        given = case.original_affine if grid == case.original_shape else case.image.affine
        affine = (
            np.eye(4) if given is None else np.asarray(torch.as_tensor(given, dtype=torch.float64))
        )
        own_grid = _same_grid(data, grid, affine) or (
            len(grid) == 2 and tuple(data.array.shape[1:]) == grid
        )
        # before the compute: a format the input cannot take is its error, at once
        if own_grid and len(grid) == 3:
            map_format = resolve_map_format(data, job.map_format)
        elif job.map_format not in ("auto", "nifti"):
            raise InputFileError(
                f"{path}: MONAI's reader gives another grid than segcam's; maps are NIfTI on the "
                f"bundle's grid (--map-format {job.map_format} does not apply)"
            )
        else:
            map_format = "nifti"
        explain = explain_options(job.explain)
        explanations, prediction = monai.explain_and_predict(
            bundle,
            case,
            self.targets,
            list(job.layers),
            list(job.methods),
            **{k: v for k, v in explain.items() if k in ("relu", "normalize", "memory_format")},
            method_options={
                m: job.method_options[m] for m in job.methods if m in job.method_options
            },
            progress=progress,
        )
        # a 2D image: MONAI's PIL reader gives (x, y), the file's (rows, columns) transposed
        flip = len(grid) == 2 and tuple(data.array.shape[1:]) == grid[::-1] != grid
        if own_grid or flip:
            shown = data.array.mean(axis=0)
        elif grid == case.original_shape:
            shown = read_original(bundle, path)[0]
        else:
            shown = case.image.as_tensor().mean(0).numpy()

        def write_map(where: Path, stem: str, heat: np.ndarray) -> Path:
            if len(grid) == 2:  # a 2D image: the map over it, as for other 2D inputs
                return write_overlay_png(where / f"{stem}.png", shown, heat.T if flip else heat)
            if own_grid:  # the input's own format and header
                return write_volume_map(where, stem, heat, data, map_format)
            return write_nifti(
                where / f"{stem}.nii.gz", heat, affine, None, description=f"segcam {stem}"
            )

        extra: list[tuple[Callable[..., Path], tuple[Any, ...]]] = []
        if self.spec.get("save_seg"):
            extra.append(_segmentation_writer(prediction, folder, output_name(path), affine, flip))
        names = [spec_class_name(spec, job.classes) for spec in job.targets]

        def finish() -> list[Path]:
            # the input's files, compressed and written (the manifest last); the caller
            # may run it while the next input computes
            written = write_outputs(explanations, folder, names, grid, write_map, extra)
            check_unchanged(path, before, file_sha256(path), written)
            info = next(iter(explanations.values())).info["monai_bundle"]
            record = {
                "path": str(path),
                "sha256": before,
                "shape": [int(case.image.shape[0]), *grid],
                "preprocessed_shape": info["preprocessed_shape"],
                "inverse": info["inverse"],
                "axes": "MONAI reader's array order",
            }
            return write_manifest(written, record, self.settings, folder, started, run)

        return finish


register_input_kind("bundle", lambda job: BundleInputs(dict(job.bundle or {})))
