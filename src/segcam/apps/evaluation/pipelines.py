"""The verdict on the user's own model (an nnU-Net model folder, a MONAI bundle) on labelled cases.

Each case is explained through the model's own pipeline (:mod:`segcam.nnunet`,
:mod:`segcam.monai`) for the predicted set of every class present, and scored per class, layer
and method:

- *energy in ground truth*, *pointing game*, *relevance rank accuracy* of the map against the
  case's label file, on the original image's grid;
- *deletion* and *insertion* AUC (Petsiuk et al., BMVC 2018): the original image perturbed at
  the map's top voxels (``steps`` + 1 fractions, a blurred baseline) and run through the whole
  pipeline again (nnU-Net's preprocessing, windows, mirroring, folds and export; a bundle's
  preprocessing, inferer and ``Invertd``); the score is the masked sum of the exported logits
  over the unperturbed predicted set, divided by the magnitude of its unperturbed value;
- *cascading randomisation* (Adebayo et al., NeurIPS 2018): the Spearman correlation of the raw
  maps (no ReLU) with those of a copy of the network whose later half (from the output), then
  all, of its parameter layers are re-initialised (seeded);
- for nnU-Net with several folds, the folds' agreement (mean pairwise Spearman inside the set).

Records go to the evaluation's report (:mod:`segcam.apps.evaluation.reports`: mean and 95%
bootstrap interval over the cases), the same tables as the built-in benchmarks.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import segcam
from segcam.apps.evaluation.reports import Record
from segcam.apps.specs import label_map
from segcam.errors import InputFileError, OptionError
from segcam.metrics import (
    deletion_insertion,
    energy_inside,
    pointing_game,
    relevance_rank_accuracy,
    spearman,
)

__all__ = ["PipelineCase", "bundle_cases", "evaluate_pipeline", "nnunet_cases", "pipeline_runs"]

Explain = Callable[..., tuple[dict[str, Any], Any]]
"""(model, targets, layers, methods, relu=True) -> (explanations, predicted(c))."""


class _Pipeline(nn.Module):
    """The model's whole pipeline as a module: original image in, exported logits out."""

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.predict = predict
        self.runs = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.runs += inputs.shape[0]
        return torch.cat([self.predict(inputs[n : n + 1]) for n in range(inputs.shape[0])])


@dataclass
class PipelineCase:
    """One labelled case and the model's pipeline around it.

    Attributes:
        name: the case's name in the report.
        inputs: (1, C, *S) the original image, what deletion and insertion perturb.
        truth: (*S) the label file's labels, on the same grid.
        predict: (1, C, *S) image -> (1, K, *S) the logits the pipeline exports.
        explain: (model, targets, layers, methods) -> (explanations, predicted(c)).
        model: the model as loaded; ``with_network(model, network)`` puts a network in place.
        network: the network randomisation copies (nnU-Net: the first fold's).
        with_network: the model with another network (for cascading randomisation).
        class_names: the classes' names (``dataset.json``, ``metadata.json``), for the report.
    """

    name: str
    inputs: torch.Tensor
    truth: torch.Tensor
    predict: Callable[[torch.Tensor], torch.Tensor]
    explain: Explain
    model: Any
    network: nn.Module
    with_network: Callable[[Any, nn.Module], Any]
    class_names: Sequence[str] = ()


def _labels(values: np.ndarray, where: Path) -> torch.Tensor:
    return torch.from_numpy(label_map(values, str(where)).astype(np.int64))


def nnunet_cases(
    folder: str | Path,
    data: Path,
    labels: Path,
    *,
    folds: Any = "all",
    step_size: float = 0.5,
    mirroring: bool = True,
) -> list[PipelineCase]:
    """The raw cases of ``data`` (``_0000`` files, as ``nnUNetv2_predict -i``) with their labels.

    A case's label file is ``labels/<case id><file ending>``, read with the plans' reader.

    Raises:
        InputFileError: a case without its label file, or a label file of another shape.
    """
    from segcam import nnunet
    from segcam.nnunet.files import case_id, channel_files, group_cases

    model = nnunet.load(folder, folds=folds)
    ending = str(model.dataset_json.get("file_ending", ".nii.gz"))
    channels = len(model.dataset_json.get("channel_names", {})) or 1
    reader = model.plans_manager.image_reader_writer_class()
    result = []
    for first in group_cases([data], ending, channels):
        name = case_id(first, ending)
        files = [str(f) for f in channel_files(first, ending, channels)]
        label_file = labels / f"{name}{ending}"
        if not label_file.is_file():
            raise InputFileError(f"{first}: no label file {label_file}")
        image, properties = reader.read_images(files)
        truth = _labels(np.asarray(reader.read_seg(str(label_file))[0][0]), label_file)
        if tuple(truth.shape) != tuple(image.shape[1:]):
            raise InputFileError(
                f"{label_file}: shape {tuple(truth.shape)}, the case's is {tuple(image.shape[1:])}"
            )

        def predict(x: torch.Tensor, properties: dict[str, Any] = properties) -> torch.Tensor:
            case = (x[0].numpy(), copy.deepcopy(properties))
            prediction = nnunet.predict(model, case, step_size=step_size, mirroring=mirroring)
            return prediction.original_logits()[None]

        def explain(
            model: Any,
            targets: list[Any],
            layers: list[str],
            methods: list[str],
            relu: bool = True,
            image: np.ndarray = image,
            properties: dict[str, Any] = properties,
        ) -> tuple[dict[str, Any], Any]:
            explanations, prediction = nnunet.explain_and_predict(
                model, (image, copy.deepcopy(properties)), targets, layers, methods,
                step_size=step_size, mirroring=mirroring, per_fold=len(model.networks) > 1,
                relu=relu,
            )  # fmt: skip
            return explanations, lambda c: prediction.predicted(model, c)

        result.append(
            PipelineCase(
                name=name,
                inputs=torch.from_numpy(np.asarray(image, dtype=np.float32))[None],
                truth=truth,
                predict=predict,
                explain=explain,
                model=model,
                network=model.networks[0],
                with_network=lambda model, network: dataclasses.replace(
                    model, networks=(network,), folds=model.folds[:1]
                ),
                class_names=tuple(model.class_names),
            )
        )
    return result


def bundle_cases(folder: str | Path, data: Path, labels: Path) -> list[PipelineCase]:
    """The images of ``data`` with their label files (``labels/<the same file name>``).

    Both are read with the bundle's own ``LoadImaged``.

    Raises:
        InputFileError: an image without its label file, or a label file of another grid.
    """
    from segcam import monai
    from segcam.apps.batch import expand_inputs
    from segcam.monai.pipeline import export_of, load_image, preprocess_loaded, read_original
    from segcam.monai.pipeline import run_inferer as bundle_inferer

    bundle = monai.load_bundle(folder)
    result = []
    for path in expand_inputs([data]):
        label_file = labels / path.name
        if not label_file.is_file():
            raise InputFileError(f"{path}: no label file {label_file}")
        loaded = load_image(bundle, path)
        values = torch.as_tensor(loaded.as_tensor(), dtype=torch.float32)
        if values.ndim != len(loaded.meta["spatial_shape"]):
            raise InputFileError(f"{path}: bundles of several input channels are not evaluated")
        truth = _labels(read_original(bundle, label_file)[0], label_file)
        if tuple(truth.shape) != tuple(values.shape):
            raise InputFileError(
                f"{label_file}: shape {tuple(truth.shape)}, the image's is {tuple(values.shape)}"
            )
        case = monai.read_case(bundle, path)

        def predict(x: torch.Tensor, loaded: Any = loaded) -> torch.Tensor:
            perturbed = loaded.clone()
            perturbed.copy_(x[0, 0].to(perturbed.dtype))
            variant = preprocess_loaded(bundle, perturbed)
            logits = bundle_inferer(bundle, variant)
            return export_of(bundle, variant)(logits, variant)[None].float()

        def explain(
            model: Any,
            targets: list[Any],
            layers: list[str],
            methods: list[str],
            relu: bool = True,
            case: Any = case,
        ) -> tuple[dict[str, Any], Any]:
            explanations, prediction = monai.explain_and_predict(
                model, case, targets, layers, methods, relu=relu
            )
            return explanations, prediction.predicted

        result.append(
            PipelineCase(
                name=path.name,
                inputs=values[None, None],
                truth=truth,
                predict=predict,
                explain=explain,
                model=bundle,
                network=bundle.network,
                with_network=lambda model, network: dataclasses.replace(model, network=network),
                class_names=bundle.class_names,
            )
        )
    return result


def _class_label(names: Sequence[str], c: int) -> str:
    return f"{names[c]} (class {c})" if c < len(names) else f"class {c}"


def pipeline_runs(classes: int, methods: int, layers: int, steps: int) -> int:
    """Runs of the whole pipeline that deletion and insertion take, per case."""
    return 2 * (steps + 1) * classes * methods * layers


def _randomise(modules: Sequence[nn.Module]) -> None:
    """PyTorch's default initialisation (or N(0, std)) for each module's own parameters."""
    with torch.no_grad():
        for module in modules:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for parameter in module.parameters(recurse=False):
                    parameter.normal_(0, float(parameter.std()) if parameter.numel() > 1 else 1.0)


def _parameter_modules_from_output(network: nn.Module, inputs: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [
        module.register_forward_hook(
            lambda _m, _i, _o, name=name: order.append(name) if name not in order else None
        )
        for name, module in network.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            network(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order[::-1]


def evaluate_pipeline(
    cases: Sequence[PipelineCase],
    methods: Sequence[str],
    layers: Sequence[str],
    *,
    dataset: str,
    steps: int = 8,
    seed: int = 0,
    example_input: torch.Tensor | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Record]:
    """Score every case (see the module's docstring): records for the evaluation's report.

    ``example_input``: an input the network takes (one window), to order its parameter layers
    from the output for randomisation; ``say`` is told the cost before the work and each case.
    """
    if steps < 1:
        raise OptionError(f"--steps must be at least 1, got {steps}")
    for case in cases:  # before any work: a label the model does not have
        values = [int(c) for c in torch.unique(case.truth).tolist()]
        if case.class_names and max(values) >= len(case.class_names):
            raise InputFileError(
                f"{case.name}: its label file holds label {max(values)}, but the model has "
                f"{len(case.class_names)} classes ({', '.join(case.class_names)})"
            )
    records: list[Record] = []
    for index, case in enumerate(cases, 1):
        classes = [int(c) for c in torch.unique(case.truth).tolist() if c > 0]
        if not classes:
            if say is not None:
                say(f"[{index}/{len(cases)}] {case.name}: no class in its label file: skipped")
            continue
        started = time.perf_counter()
        with torch.no_grad():
            case.predict(case.inputs)
        seconds = time.perf_counter() - started
        runs = pipeline_runs(len(classes), len(methods), len(layers), steps)
        if say is not None:
            say(
                f"[{index}/{len(cases)}] {case.name}: {len(classes)} class(es) x {len(methods)} "
                f"method(s) x {len(layers)} layer(s): deletion and insertion run the pipeline "
                f"{runs} times ({steps} steps; one run took {seconds:.1f} s: about "
                f"{runs * seconds / 60:.1f} min), then 2 randomised explanations"
            )
        targets = [segcam.Predicted(c) for c in classes]
        explanations, predicted = case.explain(case.model, targets, list(layers), list(methods))
        pipeline = _Pipeline(case.predict)
        randomised = _randomised_maps(case, targets, layers, methods, example_input, seed)
        for method, explanation in explanations.items():
            agreement = explanation.info.get("nnunet", {}).get("fold_agreement", {})
            for layer in layers:
                for t, c in enumerate(classes):
                    heat = explanation.layer_maps[layer][:, t].float()
                    region = (case.truth == c)[None]
                    mask = segcam.Mask(c, predicted(c))
                    record: Record = {
                        "dataset": dataset,
                        "sample": case.name,
                        "method": method,
                        "layer": layer,
                        "target": _class_label(case.class_names, c),
                        "energy in ground truth": float(energy_inside(heat, region)[0]),
                        "pointing game": float(pointing_game(heat, region)[0]),
                        "relevance rank accuracy": float(relevance_rank_accuracy(heat, region)[0]),
                    }
                    start: torch.Tensor | None = None  # the unperturbed score's magnitude
                    for mode in ("deletion", "insertion"):
                        curves = deletion_insertion(
                            pipeline, case.inputs, heat, mask, mode=mode, steps=steps,
                            batch_size=1,
                        )  # fmt: skip
                        if start is None:  # deletion's first point: nothing deleted yet
                            start = curves.scores[:, :1].abs().clamp_min(1e-6)
                        auc = torch.trapezoid(curves.scores / start, curves.fractions, dim=1)
                        record[f"{mode} AUC"] = float(auc[0])
                    for label, maps in randomised.items():
                        record[label] = float(maps[method][layer][t])
                    if agreement:
                        inside = agreement.get(layer, [{}] * len(classes))[t].get("inside")
                        record["fold agreement (inside)"] = (
                            float("nan") if inside is None else float(inside)
                        )
                    records.append(record)
    return records


def _randomised_maps(
    case: PipelineCase,
    targets: list[Any],
    layers: Sequence[str],
    methods: Sequence[str],
    example_input: torch.Tensor | None,
    seed: int,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Spearman of the maps after the later half, then all, parameter layers are randomised."""
    network = copy.deepcopy(case.network)
    if example_input is None:
        return {}
    parameter = next(iter(network.parameters()))
    names = _parameter_modules_from_output(network, example_input.to(parameter))
    modules = dict(network.named_modules())
    single = case.with_network(case.model, case.network)  # the same fold the copy comes from
    reference, _ = case.explain(single, targets, list(layers), list(methods), relu=False)
    result: dict[str, dict[str, dict[str, list[float]]]] = {}
    halves = [("Spearman, half randomised", names[: len(names) // 2]),
              ("Spearman, all randomised", names[len(names) // 2 :])]  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        for label, group in halves:
            _randomise([modules[name] for name in group])
            explanations, _ = case.explain(
                case.with_network(case.model, network), targets, list(layers), list(methods),
                relu=False,
            )  # fmt: skip
            result[label] = {
                method: {
                    layer: spearman(
                        reference[method].layer_maps[layer][0],
                        explanations[method].layer_maps[layer][0],
                    ).tolist()
                    for layer in layers
                }
                for method in methods
            }
    return result
