"""One case as nnU-Net preprocesses it: read with the plans' reader, preprocessed by nnU-Net's code.

Preprocessing (transpose, crop to the nonzero box, normalisation, resampling to the target
spacing) is not differentiated: the explanation is of the network's input as nnU-Net makes it,
and the way back to the original grid (:mod:`segcam.nnunet.geometry`) is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcam.nnunet.geometry import ExportGeometry, export_geometry
from segcam.nnunet.model import NnUNetError, NnUNetModel

__all__ = ["CaseLike", "NnUNetCase", "read_case"]

CaseLike = Any
"""A list of one case's channel files, one file, ``(array (C, *S), properties)`` or a case."""


@dataclass(frozen=True, eq=False)
class NnUNetCase:
    """A preprocessed case and how to get back to its original geometry.

    Attributes:
        data: the preprocessed input (C, *S_pre), float32, as nnU-Net's predictor gets it.
        properties: nnU-Net's properties of the case (spacing, crop box, reader's geometry).
        geometry: the export from the preprocessed grid to the original array.
        files: the image files read (empty for an array case).
    """

    data: torch.Tensor = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    geometry: ExportGeometry
    files: tuple[Path, ...] = ()

    @property
    def original_shape(self) -> tuple[int, ...]:
        """The shape of the original array, as nnU-Net's reader returns it."""
        return self.geometry.original


def _read_files(model: NnUNetModel, files: Sequence[Path]) -> tuple[np.ndarray, dict[str, Any]]:
    for path in files:
        if not path.is_file():
            raise NnUNetError(f"{path}: no such image file")
    reader = model.plans_manager.image_reader_writer_class()
    try:
        data, properties = reader.read_images([str(path) for path in files])
    except Exception as error:  # readers raise anything from RuntimeError to AssertionError
        names = ", ".join(str(path) for path in files)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise NnUNetError(f"cannot read the case {names}: {detail}") from error
    return data, properties


def read_case(model: NnUNetModel, case: CaseLike) -> NnUNetCase:
    """Read and preprocess one case the way ``nnUNetv2_predict`` does.

    Args:
        model: the loaded model (its plans name the reader and the preprocessing).
        case: the case's channel files (``_0000``, ``_0001``, ... in channel order), one file
            for a single-channel model, ``(array (C, *S), properties)`` as
            ``nnUNetPredictor.predict_single_npy_array`` takes them (``properties`` holds at
            least ``spacing``, in the array's axis order), or an :class:`NnUNetCase`.

    Raises:
        NnUNetError: an unreadable or missing file, a wrong number of channels, NaN/Inf values,
            a cascade stage (it needs the previous stage's segmentation), a non-linear export.
    """
    if isinstance(case, NnUNetCase):
        return case
    previous = model.configuration_manager.previous_stage_name
    if previous is not None:
        raise NnUNetError(
            f"{model.configuration} is a cascade stage: its input includes the segmentation of "
            f"{previous}, which segcam does not run; explain {previous} itself or a full-"
            f"resolution configuration"
        )
    files: tuple[Path, ...] = ()
    if isinstance(case, tuple) and len(case) == 2 and not isinstance(case[0], str | Path):
        array, given = case
        if not isinstance(given, dict) or "spacing" not in given:
            raise NnUNetError(
                "an array case needs properties with 'spacing', e.g. {'spacing': ...}"
            )
        data = np.asarray(array)
        properties = copy.deepcopy(given)  # nnU-Net's preprocessing writes into it
    else:
        items = [case] if isinstance(case, str | Path) else list(case)
        if not items or not all(isinstance(item, str | Path) for item in items):
            raise NnUNetError(
                "a case is a list of its channel files, one file, or (array, properties)"
            )
        files = tuple(Path(item) for item in items)
        data, properties = _read_files(model, files)
    channels = len(model.dataset_json.get("channel_names", {}))
    if data.ndim != 4 or data.shape[0] != channels:
        raise NnUNetError(
            f"the case has {data.shape[0] if data.ndim else 0} channel(s) of shape "
            f"{tuple(data.shape[1:])}; the model takes {channels} "
            f"({', '.join(map(str, model.dataset_json.get('channel_names', {}).values()))}) of "
            f"a 3D image (C, X, Y, Z)"
        )
    if not np.issubdtype(data.dtype, np.number) or not np.isfinite(data).all():
        raise NnUNetError("the case holds NaN or Inf values (or is not numeric)")
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)
    result = preprocessor.run_case_npy(
        data, None, properties, model.plans_manager, model.configuration_manager, model.dataset_json
    )
    preprocessed = result[0]
    if len(result) > 2:  # 2.8 returns the properties; before, they were updated in place
        properties = result[2]
    tensor = torch.from_numpy(preprocessed).to(dtype=torch.float32).contiguous()
    geometry = export_geometry(
        model.plans_manager, model.configuration_manager, properties, tensor.shape[1:]
    )
    return NnUNetCase(data=tensor, properties=properties, geometry=geometry, files=files)
