"""A MONAI bundle as its own config describes it: network, weights, pipeline and inferer.

A bundle folder (the MONAI Model Zoo's layout) holds ``configs/inference.json`` (or
``.yaml``), optionally ``configs/metadata.json``, and ``models/model.pt``. The config is read
with MONAI's ``ConfigParser`` with ``bundle_root`` set to the folder, as ``monai.bundle.run``
reads it; ``network_def`` is built and the checkpoint loaded into it with
``torch.load(weights_only=True)`` (a state dict, or one under ``model``/``state_dict``/
``network``); ``preprocessing``, ``inferer`` and ``postprocessing`` are the config's own
objects. The inferer's sliding-window settings map onto segcam's sliding windows
(:meth:`MonaiBundle.sliding_window`); settings segcam's windows do not reproduce are refused by
name.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcam.errors import SegCamError

__all__ = ["BundleError", "MonaiBundle", "load_bundle", "quiet_monai"]

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
STATE_KEYS = ("model", "state_dict", "network")


@contextmanager
def quiet_monai() -> Iterator[None]:
    """MONAI's notes about itself left out: its changing defaults, its optional DICOM decoders.

    They speak of MONAI's internals (a default that changes in a later version, the GPU JPEG
    decoder it does not find), not of the user's bundle or image.
    """
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            yield
    finally:
        logger.setLevel(level)


class BundleError(SegCamError, ValueError):
    """A bundle folder segcam cannot use as it is (one line: what and where)."""


def _text(value: Any) -> str:
    """An enum's value (MONAI's blend and pad modes) or the value, as text."""
    return str(getattr(value, "value", value))


@dataclass(eq=False)
class MonaiBundle:
    """A loaded bundle: its network (eval mode, weights loaded) and its own pipeline objects.

    Attributes:
        folder: the bundle folder.
        network: ``network_def`` with the checkpoint's weights.
        preprocessing: the config's ``preprocessing`` (None where absent).
        inferer: the config's ``inferer`` (None where absent).
        postprocessing: the config's ``postprocessing`` (None where absent).
        in_channels: the network's input channels (metadata, else ``network_def``'s
            ``in_channels``; None when neither says).
        out_channels: the network's output channels K, found the same way.
        metadata: ``configs/metadata.json`` (empty without one).
    """

    folder: Path
    network: nn.Module
    preprocessing: Any = None
    inferer: Any = None
    postprocessing: Any = None
    in_channels: int | None = None
    out_channels: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' names (``metadata.json``'s ``channel_def``), or ().

        A single-channel (sigmoid) output is segcam's two classes: ``background`` and the
        channel's own name (class 1, the logit).
        """
        try:
            channels = self.metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
            names = {int(k): str(v) for k, v in channels.items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return ()
        count = self.out_channels or len(names)
        if sorted(names) != list(range(count)):
            return ()
        if count == 1:
            return ("background", names[0])
        return tuple(names[i] for i in range(count))

    def sliding_window(self) -> dict[str, Any] | None:
        """The inferer's sliding windows as segcam's settings (None: the whole input at once).

        Raises:
            BundleError: an inferer segcam's windows do not reproduce (another kind, padding
                other than zeros, coordinates fed to the network).
        """
        inferer = self.inferer
        if inferer is None or type(inferer).__name__ == "SimpleInferer":
            return None
        name = type(inferer).__name__
        if name != "SlidingWindowInferer":
            raise BundleError(f"{self.folder}: the inferer {name} is not supported (a "
                              f"SlidingWindowInferer or SimpleInferer is)")  # fmt: skip
        if _text(inferer.padding_mode) != "constant" or float(inferer.cval) != 0.0:
            raise BundleError(
                f"{self.folder}: the inferer pads with {_text(inferer.padding_mode)} "
                f"(cval {inferer.cval}); segcam's windows pad with zeros"
            )
        if getattr(inferer, "with_coord", False):
            raise BundleError(f"{self.folder}: the inferer feeds window coordinates to the network")
        mode = _text(inferer.mode)
        if mode not in ("constant", "gaussian"):
            raise BundleError(f"{self.folder}: the inferer blends with {mode!r}; "
                              f"constant or gaussian are supported")  # fmt: skip
        size = inferer.roi_size
        roi: int | list[int] = (
            [int(r) for r in size] if isinstance(size, list | tuple) else int(size)
        )
        overlap = inferer.overlap
        return {
            "roi_size": roi,
            "overlap": [float(o) for o in overlap] if isinstance(overlap, (list, tuple))
            else float(overlap),
            "mode": mode,
            "sigma_scale": float(inferer.sigma_scale)
            if not isinstance(inferer.sigma_scale, (list, tuple))
            else [float(s) for s in inferer.sigma_scale],
            "sw_batch_size": int(inferer.sw_batch_size),
        }  # fmt: skip


def _config_file(folder: Path) -> Path:
    configs = folder / "configs"
    for name in CONFIG_NAMES:
        if (configs / name).is_file():
            return configs / name
    raise BundleError(
        f"{folder}: no configs/inference.json (or .yaml): not a MONAI bundle folder in the Model "
        f"Zoo's layout"
    )


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(f"{path}: the bundle's checkpoint is missing (models/model.pt)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for pickles and damaged files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BundleError(
            f"{path}: cannot be read as weights only ({first}); segcam loads tensors, never "
            f"pickled code"
        ) from None
    if isinstance(loaded, Mapping):
        for key in STATE_KEYS:
            nested = loaded.get(key)
            if (
                isinstance(nested, Mapping)
                and nested
                and all(isinstance(v, torch.Tensor) for v in nested.values())
            ):
                loaded = nested
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise BundleError(f"{path}: not a state dict (nor one under {', '.join(STATE_KEYS)})")
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def _channels(metadata: Mapping[str, Any], parser: Any, side: str) -> int | None:
    """Input (``side="inputs"``) or output channels: the metadata's, else ``network_def``'s."""
    key, argument = ("image", "in_channels") if side == "inputs" else ("pred", "out_channels")
    try:
        return int(metadata["network_data_format"][side][key]["num_channels"])
    except (KeyError, TypeError, ValueError):
        pass
    try:
        return int(parser["network_def"][argument])
    except (KeyError, TypeError, ValueError):
        return None


def load_bundle(
    folder: str | Path, *, checkpoint: str = "models/model.pt", device: str | torch.device = "cpu"
) -> MonaiBundle:
    """Read a MONAI bundle folder: network with weights, preprocessing, inferer, postprocessing.

    Raises:
        BundleError: not a bundle folder, a config MONAI cannot parse (the item named), no
            ``network_def``, a checkpoint that is missing, pickled or does not fit the network.
        MissingExtraError: MONAI is not installed.
    """
    from segcam.errors import MissingExtraError

    try:
        with quiet_monai():
            from monai.bundle.config_parser import ConfigParser
    except ImportError as error:
        raise MissingExtraError(
            f"MONAI bundles need pip install 'segcam[monai]' ({error})"
        ) from None
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file, not a bundle folder" if folder.exists() else "no such bundle folder"
        raise BundleError(f"{folder}: {what}")
    config = _config_file(folder)
    with quiet_monai():
        return _load(folder, config, checkpoint, device, ConfigParser)


def _load(
    folder: Path, config: Path, checkpoint: str, device: str | torch.device, config_parser: Any
) -> MonaiBundle:
    parser = config_parser()
    metadata: dict[str, Any] = {}
    meta = folder / "configs" / "metadata.json"
    try:
        if meta.is_file():
            parser.read_meta(str(meta))
            metadata = dict(parser.get("_meta_", {}) or {})
        parser.read_config(str(config))
    except Exception as error:  # JSON/YAML errors of several kinds
        raise BundleError(f"{config}: cannot be read ({error})") from None
    parser["bundle_root"] = str(folder)
    if "network_def" not in parser:
        raise BundleError(f"{config}: no network_def (the network the bundle builds)")

    def parsed(key: str) -> Any:
        if key not in parser:
            return None
        try:
            return parser.get_parsed_content(key)
        except Exception as error:  # MONAI reports a failed item with its own exception types
            reason = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise BundleError(f"{config}: {key} cannot be built ({reason})") from None

    network = parsed("network_def")
    if not isinstance(network, nn.Module):
        raise BundleError(
            f"{config}: network_def is a {type(network).__name__}, not a torch module"
        )
    state = _state_dict(folder / checkpoint)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = next((line for line in lines[1:]), lines[0] if lines else "")
        raise BundleError(
            f"{folder / checkpoint}: does not fit network_def ({detail[:300]})"
        ) from None
    network = network.to(device).eval()
    return MonaiBundle(
        folder=folder,
        network=network,
        preprocessing=parsed("preprocessing"),
        inferer=parsed("inferer"),
        postprocessing=parsed("postprocessing"),
        in_channels=_channels(metadata, parser, "inputs"),
        out_channels=_channels(metadata, parser, "outputs"),
        metadata=metadata,
    )
