"""The batch's nnU-Net input kind: cases of channel files, explained with :mod:`segcam.nnunet`.

A batch job with an ``nnunet`` spec (``segcam explain --nnunet MODEL_FOLDER``) takes raw cases
as ``nnUNetv2_predict -i`` does (a case is named by its ``_0000`` file, its other channels lie
beside it) and writes per case, into ``out/<case id>/``:

- ``<method>.npz``: the explanation (maps, logits, pixel sets on the original grid, in the array
  order of nnU-Net's reader);
- ``<method>__<layer>__t<i>-<kind>-<class><file_ending>``: one float32 map per target and layer
  in the case's own format and geometry;
- ``<case id><file_ending>`` with ``save_seg``: nnU-Net's segmentation, by nnU-Net's writer;
- ``manifest.json`` last.

Targets on the command line use segcam's (i, j, k) voxel order for boxes and pixels, as for other
3D inputs; they are turned to the reader's array order (k, j, i) here. Mask files are read with
the model's own reader, so they share the case's array order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from segcam.apps.batch.inputs import explain_options
from segcam.apps.batch.job import BatchJob, register_input_kind
from segcam.apps.batch.outputs import (
    RunClaim,
    check_unchanged,
    clear_previous,
    write_manifest,
    write_outputs,
)
from segcam.apps.naming import folder_name, spec_class_name
from segcam.errors import TargetError
from segcam.targets import Box, Pixel, Region, Target

__all__ = [
    "NnUNetCaseJob",
    "NnUNetCases",
    "case_digest",
    "case_name",
    "expand_cases",
    "folder_facts",
    "load_spec",
    "resolve_folds",
    "spec_settings",
]


def folder_facts(folder: str | Path) -> dict[str, Any]:
    """What the batch needs from a model folder before nnunetv2 is imported (plain JSON)."""
    from segcam.nnunet.model import NnUNetError, class_names

    root = Path(folder)
    try:
        dataset = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        plans = json.loads((root / "plans.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise NnUNetError(
            f"{root}: not an nnU-Net trained-model folder (plans.json and dataset.json "
            f"readable): {error}"
        ) from None
    return {
        "file_ending": str(dataset.get("file_ending", ".nii.gz")),
        "channels": len(dataset.get("channel_names", {})) or 1,
        "reader": str(plans.get("image_reader_writer", "SimpleITKIO")),
        "classes": list(class_names(dataset)),
    }


def resolve_folds(spec: dict[str, Any]) -> list[int | str]:
    """The spec's folds (``"all"``: every fold present), checked to hold the checkpoint."""
    from segcam.nnunet.model import choose_folds

    folds = spec.get("folds")
    chosen = "all" if folds in (None, "all") else list(folds)
    return choose_folds(
        Path(spec["folder"]), chosen, spec.get("checkpoint", "checkpoint_final.pth")
    )


def spec_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the manifest records it: folds resolved, SHA-256 of what makes the model.

    Each checkpoint, ``plans.json`` and ``dataset.json``.
    """
    from segcam.apps.specs import file_sha256

    folder = Path(spec["folder"])
    checkpoint = spec.get("checkpoint", "checkpoint_final.pth")
    folds = resolve_folds(spec)
    return {
        **spec,
        "folder": str(folder),
        "folds": [str(f) for f in folds],
        "checkpoint_sha256": {
            str(f): file_sha256(folder / f"fold_{f}" / checkpoint) for f in folds
        },
        # the preprocessing (normalisation, spacing) and the labels are the model too
        "plans_sha256": file_sha256(folder / "plans.json"),
        "dataset_sha256": file_sha256(folder / "dataset.json"),
    }


def _fold(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def load_spec(spec: dict[str, Any], device: Any) -> Any:
    """The nnU-Net model of a spec (:func:`segcam.nnunet.load`)."""
    from segcam import nnunet

    return nnunet.load(  # the folds only: the manifest's settings hash the checkpoints
        spec["folder"],
        folds=tuple(_fold(str(f)) for f in resolve_folds(spec)),
        checkpoint=spec.get("checkpoint", "checkpoint_final.pth"),
        device=device,
        trust_checkpoint=bool(spec.get("trust_checkpoint", False)),
    )


def expand_cases(inputs: Sequence[Path], spec: dict[str, Any], exclude: Path | None) -> list[Path]:
    """The cases among the inputs (folders of raw cases, case files), each as its ``_0000`` file."""
    from segcam.nnunet.files import group_cases
    from segcam.nnunet.model import NnUNetError

    facts = folder_facts(spec["folder"])
    skip = exclude.resolve() if exclude is not None else None
    for path in inputs:
        if skip is not None and path.resolve().is_relative_to(skip):
            raise NnUNetError(
                f"{path}: lies in the output folder {exclude}; choose an --out outside the cases"
            )
    return group_cases(list(inputs), facts["file_ending"], facts["channels"])


def case_name(path: Path, spec: dict[str, Any]) -> str:
    """The case id: the output folder's name."""
    from segcam.nnunet.files import case_id

    name = case_id(path, folder_facts(spec["folder"])["file_ending"])
    return folder_name(name)


def _files(path: Path, spec: dict[str, Any]) -> list[Path]:
    from segcam.nnunet.files import channel_files

    facts = folder_facts(spec["folder"])
    return channel_files(path, facts["file_ending"], facts["channels"])


def case_digest(path: Path, spec: dict[str, Any]) -> str:
    """One SHA-256 over the case's channel files (names and contents' digests)."""
    import hashlib

    from segcam.apps.specs import file_sha256

    digest = hashlib.sha256()
    for file in _files(path, spec):
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def to_reader_order(target: Target, reverse: bool) -> Target:
    """A box or pixel given in (i, j, k) order, in the reader's (k, j, i) array order."""
    if not reverse:
        return target
    if isinstance(target, Box):
        if len(target.slices) != 3:
            raise TargetError(f"{target!r}: an nnU-Net case is 3D; give I0,J0,K0,I1,J1,K1")
        return replace(target, slices=list(reversed(list(target.slices))))
    if isinstance(target, Pixel):
        index = tuple(int(v) for v in cast(Sequence[int], target.index))
        if len(index) != 3:
            raise TargetError(f"{target!r}: an nnU-Net case is 3D; give I,J,K")
        return replace(target, index=tuple(reversed(index)))
    return target


def parse_case_target(spec: str, classes: Sequence[str], reverse: bool) -> Target:
    """A ``--target`` for nnU-Net cases: mask and region files are read by the model's reader."""
    from segcam.apps.specs import parse_class, parse_target, split_label

    kind, _, rest = spec.partition(":")
    class_text, _, argument = rest.partition(":")
    if kind in ("mask", "region") and argument:
        if not class_text:
            raise TargetError(f"--target {spec!r}: expected KIND:CLASS:FILE")
        c = parse_class(class_text, classes)
        path, _ = split_label(argument, spec)  # FILE=LABEL: read by segcam.nnunet.targets
        if not Path(path).is_file():
            raise TargetError(f"--target {spec!r}: no such file {path}")
        from segcam.targets import Mask

        return Region(c, argument) if kind == "region" else Mask(c, argument)
    return to_reader_order(parse_target(spec, classes), reverse)


@dataclass(frozen=True)
class NnUNetCases:
    """nnU-Net cases of channel files, explained with :mod:`segcam.nnunet` (an input kind)."""

    spec: dict[str, Any]

    def expand(self, inputs: Sequence[Path], exclude: Path | None) -> list[Path]:  # noqa: D102
        return expand_cases(inputs, self.spec, exclude)

    def name(self, path: Path) -> str:  # noqa: D102
        return case_name(path, self.spec)

    def digest(self, path: Path) -> str:  # noqa: D102
        return case_digest(path, self.spec)

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {"nnunet": spec_settings(self.spec)}

    def build(self, job: BatchJob) -> NnUNetCaseJob:  # noqa: D102
        from segcam.layers import resolve_layers
        from segcam.nnunet.files import reverses_axes

        facts = folder_facts(self.spec["folder"])
        reverse = reverses_axes(facts["reader"])
        model = load_spec(self.spec, torch.device(job.device))
        resolve_layers(model.networks[0], list(job.layers))  # an unknown layer: before any case
        return NnUNetCaseJob(
            job=job,
            spec=dict(self.spec),
            model=model,
            targets=[parse_case_target(s, facts["classes"], reverse) for s in job.targets],
            settings=job.settings(),
        )


@dataclass
class NnUNetCaseJob:
    """A loaded nnU-Net model and parsed targets: explains one case and writes its outputs."""

    job: BatchJob
    spec: dict[str, Any]
    model: Any  # a segcam.nnunet.NnUNetModel
    targets: list[Target]
    settings: dict[str, Any]

    def explain(
        self,
        path: Path,
        out: Path,
        progress: Callable[[int, int], None] | None = None,
        run: RunClaim | None = None,
    ) -> list[Path]:
        """Explain ``path`` and write its files: :meth:`prepare`, then its write step."""
        return self.prepare(path, out, progress, run)()

    def prepare(
        self,
        path: Path,
        out: Path,
        progress: Callable[[int, int], None] | None = None,
        run: RunClaim | None = None,
    ) -> Callable[[], list[Path]]:
        """Explain one case (nnU-Net's whole inference); return the step writing its files."""
        from segcam import nnunet
        from segcam.nnunet.files import write_map, write_segmentation

        started = time.perf_counter()
        job, spec, model = self.job, self.spec, self.model
        facts = folder_facts(spec["folder"])
        ending, name = facts["file_ending"], case_name(path, spec)
        clear_previous(out / name)
        before = case_digest(path, spec)  # what is read, checked again at the end
        files = _files(path, spec)
        case = nnunet.read_case(model, files)
        explain = explain_options(job.explain)
        explanations, prediction = nnunet.explain_and_predict(
            model,
            case,
            self.targets,
            list(job.layers),
            list(job.methods),
            step_size=float(spec.get("step_size", 0.5)),
            mirroring=bool(spec.get("mirroring", True)),
            **{
                k: v
                for k, v in explain.items()
                if k in ("relu", "upsample", "normalize", "memory_format")
            },
            method_options={
                m: job.method_options[m] for m in job.methods if m in job.method_options
            },
            per_fold=bool(spec.get("per_fold", False)),
            progress=progress,
        )

        def map_writer(folder: Path, stem: str, heat: np.ndarray) -> Path:
            return write_map(folder / f"{stem}{ending}", heat, facts["reader"], case.properties)

        extra: list[tuple[Callable[..., Path], tuple[Any, ...]]] = []
        if spec.get("save_seg"):
            writer = model.plans_manager.image_reader_writer_class()
            segmentation = out / name / f"{name}{ending}"
            extra.append(
                (
                    write_segmentation,
                    (segmentation, prediction.segmentation, writer, case.properties),
                )
            )
        names = [spec_class_name(spec, facts["classes"]) for spec in job.targets]
        grid = tuple(case.original_shape)

        def finish() -> list[Path]:
            # the input's files, compressed and written (the manifest last); the caller
            # may run it while the next input computes
            written = write_outputs(explanations, out / name, names, grid, map_writer, extra)
            agreement: dict[str, Any] = {}
            if spec.get("per_fold"):  # each fold's own maps, named __fold_<f>, and their agreement
                first = next(iter(explanations.values()))
                for member in first.members:
                    folds = {m: e.members[member] for m, e in explanations.items()}
                    written += write_outputs(
                        folds, out / name, names, grid, map_writer, suffix=f"__{member}"
                    )
                agreement = {
                    m: e.info["nnunet"].get("fold_agreement", {}) for m, e in explanations.items()
                }
            check_unchanged(path, before, case_digest(path, spec), written)
            record: dict[str, Any] = {
                "path": str(path),
                "files": [str(f) for f in files],
                "sha256": before,
                "shape": [len(files), *case.original_shape],
                "axes": "nnU-Net reader's array order" + (" (k, j, i)" if _reverses(facts) else ""),
            }
            if agreement:  # per method, layer and target: the folds' mean Spearman correlation
                record["fold_agreement"] = agreement
            return write_manifest(written, record, self.settings, out / name, started, run)

        return finish


def _reverses(facts: dict[str, Any]) -> bool:
    from segcam.nnunet.files import reverses_axes

    return reverses_axes(facts["reader"])


register_input_kind("nnunet", lambda job: NnUNetCases(dict(job.nnunet or {})))
