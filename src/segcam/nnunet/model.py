"""Loading nnU-Net v2 trained-model folders.

:func:`load` reads a trained-model folder (``plans.json``, ``dataset.json``,
``fold_X/checkpoint_final.pth``) and builds the network the way nnU-Net's trainer builds it:
custom trainers included, deep supervision off, never compiled, one module per fold (nnU-Net's
own predictor loads every fold into one module in place; a graph kept across folds would be
corrupted). Checkpoints load with ``torch.load(weights_only=True)``, allowing only the plain NumPy
types nnU-Net checkpoints carry; any other pickled object is refused unless
``trust_checkpoint=True``.
"""

from __future__ import annotations

import inspect
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segcam.errors import MissingExtraError, SegCamError

__all__ = [
    "NnUNetError",
    "NnUNetModel",
    "available_folds",
    "block_name",
    "choose_folds",
    "class_names",
    "load",
]


class NnUNetError(SegCamError, ValueError):
    """A trained-model folder or checkpoint that cannot be used, with the reason."""


def _require_nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            "explaining nnU-Net models needs nnunetv2: pip install 'segcam[nnunet]'"
        ) from error


@dataclass(frozen=True, eq=False)
class NnUNetModel:
    """A loaded nnU-Net v2 model: its networks (one per fold) and what inference needs.

    Attributes:
        folder: the trained-model folder.
        configuration: the configuration's name (``3d_fullres``, ``2d``, ...).
        trainer_name: the trainer class that built the network.
        folds: the folds loaded, in order.
        networks: one network per fold, in eval mode, deep supervision off.
        mirroring_axes: the checkpoint's ``inference_allowed_mirroring_axes`` (``None``: none).
        class_names: the output channels' names from ``dataset.json``: labels by value, or the
            regions (without background) in their order for region-based models.
        plans_manager, configuration_manager, label_manager, dataset_json: nnU-Net's own objects.
    """

    folder: Path
    configuration: str
    trainer_name: str
    folds: tuple[int | str, ...]
    networks: tuple[nn.Module, ...] = field(repr=False)
    mirroring_axes: tuple[int, ...] | None
    class_names: tuple[str, ...]
    plans_manager: Any = field(repr=False)
    configuration_manager: Any = field(repr=False)
    label_manager: Any = field(repr=False)
    dataset_json: dict[str, Any] = field(repr=False)


_READABLE = (
    (re.compile(r"^encoder\.stem$"), "stem"),
    (re.compile(r"^encoder\.stages\.(\d+)$"), "encoder stage {0}"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)$"), "decoder up-sampling {0}"),
    (re.compile(r"^decoder\.stages\.(\d+)$"), "decoder stage {0}"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)$"), "segmentation head {0}"),
)


def block_name(name: str) -> str:
    """A short description of an nnU-Net (dynamic-network-architectures) block, or ''."""
    for pattern, text in _READABLE:
        match = pattern.match(name)
        if match:
            return text.format(*match.groups())
    return ""


def class_names(dataset_json: dict[str, Any]) -> tuple[str, ...]:
    """The output channels' names: labels by value, or regions in order (no background).

    A model is region-based when some label is a list of several values (as nnU-Net's
    ``LabelManager`` decides); ``ignore`` is not an output.
    """
    labels = {k: v for k, v in dataset_json.get("labels", {}).items() if k != "ignore"}
    if any(isinstance(v, list | tuple) and len(v) > 1 for v in labels.values()):
        return tuple(k for k in labels if k != "background")
    return tuple(sorted(labels, key=lambda name: int(np.ravel(labels[name])[0])))


def available_folds(folder: Path, checkpoint: str) -> list[int | str]:
    """The folds of a model folder that hold ``checkpoint`` (``fold_all`` as ``"all"``)."""
    found: list[int | str] = []
    for path in sorted(folder.glob("fold_*")):
        name = path.name.removeprefix("fold_")
        if (path / checkpoint).is_file():
            found.append(int(name) if name.isdigit() else name)
    return found


def _numpy_globals() -> list[Any]:
    """The plain NumPy types nnU-Net checkpoints pickle (scalars of logged metrics)."""
    multiarray = getattr(np, "_core", None) or np.core
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)
    return [multiarray.multiarray.scalar, np.dtype, *(type(np.dtype(kind)) for kind in kinds)]


def _read_checkpoint(path: Path, trust: bool) -> dict[str, Any]:
    try:
        checkpoint = _load_checkpoint(path, trust)
    except NnUNetError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # a damaged or foreign file
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise NnUNetError(
            f"{path}: cannot read the checkpoint ({type(error).__name__}: {first}); the file is "
            f"damaged or not a PyTorch checkpoint (copy it again from its source)"
        ) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise NnUNetError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def _load_checkpoint(path: Path, trust: bool) -> Any:
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
        raise NnUNetError(
            f"{path}: the checkpoint pickles objects beyond tensors and plain types "
            f"({detail or type(error).__name__}); load it with trust_checkpoint=True only if "
            f"you trust its source (unpickling runs code from the file)"
        ) from None


def _strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "_orig_mod."  # a network trained with nnUNet_compile=1
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _nnunet_trainer_lookup() -> Any:
    """nnU-Net's own trainer lookup: ``find_objects``' (2.8) or ``find_class_by_name``'s."""
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    except ImportError:  # before 2.8: the search over the trainer package's folder
        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

        folder = str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer")

        def recursive_find_trainer_class_by_name(name: str) -> Any:
            return recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer")

    return recursive_find_trainer_class_by_name


def _find_trainer(name: str, nnunet_lookup: Any) -> Any:
    """The trainer class nnU-Net would use, also where some trainer modules fail to import.

    nnU-Net's own lookup imports every trainer module until it finds the name; one module
    that fails to import (variants built on timm import torchvision, which fails where torch
    and torchvision builds disagree) ends that search. Then each module is tried on its own.
    """
    try:
        return nnunet_lookup(name)
    except Exception:  # an unrelated module's import failure, or an unknown name
        pass
    import importlib
    import pkgutil

    package = importlib.import_module("nnunetv2.training.nnUNetTrainer")
    prefix = package.__name__ + "."
    for info in pkgutil.walk_packages(package.__path__, prefix, onerror=lambda _: None):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a module that cannot be imported here cannot hold the trainer
            continue
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    return None


def load(
    model_folder: str | Path,
    folds: tuple[int | str, ...] | str = (0,),
    checkpoint: str = "checkpoint_final.pth",
    *,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
) -> NnUNetModel:
    """Load an nnU-Net v2 trained-model folder for explanation.

    Args:
        model_folder: the folder holding ``plans.json``, ``dataset.json`` and ``fold_X/``.
        folds: fold numbers (or ``"all"`` for every fold present).
        checkpoint: the checkpoint file name in each fold folder.
        device: where the networks go.
        trust_checkpoint: allow checkpoints that pickle arbitrary objects (runs their code).

    Returns:
        An :class:`NnUNetModel`.

    Raises:
        NnUNetError: a missing file or fold, a checkpoint that is not nnU-Net's or pickles
            objects (without ``trust_checkpoint``), folds of different configurations, weights
            that do not fit the network.
        MissingExtraError: nnunetv2 is not installed.
    """
    _require_nnunet()
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(model_folder)
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise NnUNetError(f"{folder}: no {name}; expected an nnU-Net trained-model folder")
    chosen = choose_folds(folder, folds, checkpoint)
    plans_manager = PlansManager(_read_json(folder / "plans.json"))
    dataset_json = _read_json(folder / "dataset.json")
    if not isinstance(dataset_json.get("labels"), dict) or not dataset_json["labels"]:
        raise NnUNetError(
            f"{folder / 'dataset.json'}: no 'labels' (class name -> label value); nnU-Net "
            f"writes them when it plans a dataset"
        )
    checkpoints = [
        _read_checkpoint(folder / f"fold_{fold}" / checkpoint, trust_checkpoint) for fold in chosen
    ]
    trainer_name = checkpoints[0]["trainer_name"]
    configuration, configuration_manager = _configuration(
        folder, chosen, checkpoints, plans_manager
    )
    label_manager = plans_manager.get_label_manager(dataset_json)
    trainer = _find_trainer(trainer_name, _nnunet_trainer_lookup())
    if trainer is None:
        raise NnUNetError(f"{folder}: trainer {trainer_name!r} is not installed")
    inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    outputs = label_manager.num_segmentation_heads
    networks = []
    for fold, saved in zip(chosen, checkpoints, strict=True):
        try:
            network = _build_network(
                trainer, (plans_manager, configuration_manager), inputs, outputs
            )
        except Exception as error:  # an unknown class, a package missing: nnU-Net's own errors
            name = getattr(configuration_manager, "network_arch_class_name", "the network")
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            raise NnUNetError(
                f"{folder}: cannot build {name} for {configuration} ({type(error).__name__}: "
                f"{first}); is the package that defines it installed?"
            ) from error
        try:
            network.load_state_dict(_strip_compile_prefix(saved["network_weights"]))
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).strip().splitlines()]
            first = " ".join(lines[1:2] or lines[:1])[:300]
            raise NnUNetError(f"{folder}: fold {fold}'s weights do not fit: {first}") from error
        networks.append(network.to(device).eval())
    names = class_names(dataset_json)
    mirroring = checkpoints[0].get("inference_allowed_mirroring_axes")
    return NnUNetModel(
        folder=folder,
        configuration=configuration,
        trainer_name=trainer_name,
        folds=tuple(chosen),
        networks=tuple(networks),
        mirroring_axes=tuple(int(a) for a in mirroring) if mirroring is not None else None,
        class_names=names,
        plans_manager=plans_manager,
        configuration_manager=configuration_manager,
        label_manager=label_manager,
        dataset_json=dataset_json,
    )


def choose_folds(folder: Path, folds: Any, checkpoint: str) -> list[int | str]:
    """The folds asked for (``"all"``: every fold present), each once and holding the checkpoint."""
    available = available_folds(folder, checkpoint)
    chosen: list[int | str] = (
        list(available) if folds == "all" else [folds] if isinstance(folds, int) else list(folds)
    )
    repeated = sorted({str(fold) for fold in chosen if chosen.count(fold) > 1})
    if repeated:
        raise NnUNetError(f"fold(s) {', '.join(repeated)} given more than once")
    missing = [fold for fold in chosen if fold not in available]
    if missing or not chosen:
        raise NnUNetError(
            f"{folder}: no {checkpoint} for fold(s) {missing or chosen}; folds present: "
            f"{available or 'none'}"
        )
    return chosen


def _build_network(trainer: Any, managers: tuple[Any, Any], inputs: int, outputs: int) -> nn.Module:
    """A fold's network, built as its trainer builds it (weights not loaded)."""
    plans_manager, configuration_manager = managers
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        network = trainer.build_network_architecture(
            plans_manager, configuration_manager, inputs, outputs,
            enable_deep_supervision=False,
        )  # fmt: skip
    else:  # the older signature of custom trainers
        network = trainer.build_network_architecture(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            inputs, outputs, enable_deep_supervision=False,
        )  # fmt: skip
    result: nn.Module = network
    return result


def _configuration(
    folder: Path, folds: list[int | str], checkpoints: list[dict[str, Any]], plans_manager: Any
) -> tuple[str, Any]:
    """The folds' one configuration and its manager; a cascade stage is refused."""
    configuration = str(checkpoints[0]["init_args"]["configuration"])
    for fold, other in zip(folds[1:], checkpoints[1:], strict=True):
        if other["init_args"]["configuration"] != configuration:
            raise NnUNetError(
                f"{folder}: fold {fold} is {other['init_args']['configuration']}, fold "
                f"{folds[0]} is {configuration}; explain folds of one configuration"
            )
    configuration_manager = plans_manager.get_configuration(configuration)
    previous = configuration_manager.previous_stage_name
    if previous is not None:
        raise NnUNetError(
            f"{folder}: {configuration} is a cascade stage: its input includes the segmentation "
            f"of {previous}, which segcam does not run; explain {previous} itself or a full-"
            f"resolution configuration"
        )
    return configuration, configuration_manager


def _read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON file as a dict, or one clear NnUNetError."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NnUNetError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(value, dict):
        raise NnUNetError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
