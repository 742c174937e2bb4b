r"""The way back from nnU-Net's network grid to the original image, and its adjoint.

nnU-Net exports its logits by resampling them from the preprocessed grid to the cropped
original shape (``resampling_fn_probabilities``: per axis half-pixel linear, or nearest /
linear along the low-resolution axis for anisotropic data), inserting them into the crop box
and transposing the axes back. Every step is linear and separable, so the whole map is

$$
E = P_{\text{backward}} \circ U_{\text{bbox}} \circ (R_0 \otimes R_1 \otimes R_2),
$$

with one matrix $R_k$ per axis. :class:`ExportGeometry` holds these matrices and applies
$E$ (maps and logits to the original grid) and its adjoint $E^\top$ (a target's pixel set on
the original grid to the weights on the preprocessed grid, $W = E^\top M$).

The matrices reproduce ``skimage.transform.resize(order=1, mode="edge", anti_aliasing=False)``
and ``scipy.ndimage.map_coordinates(order=0 or 1, mode="nearest")`` as nnU-Net calls them
(coordinates $(i + 1/2)\, n_{in} / n_{out} - 1/2$, clamped to the edge), which the tests check
against nnU-Net's own function in float64.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcam.nnunet.model import NnUNetError

__all__ = ["ExportGeometry", "export_geometry", "linear_matrix", "nearest_matrix"]


def _coordinates(n_out: int, n_in: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def linear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Half-pixel linear resampling of one axis from n_in to n_out samples, (n_out, n_in)."""
    if n_out == n_in:
        return np.eye(n_in)
    x = np.clip(_coordinates(n_out, n_in), 0, n_in - 1)
    low = np.floor(x).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = x - low
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def nearest_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Nearest-neighbour resampling of one axis as ``map_coordinates(order=0, mode="nearest")``."""
    if n_out == n_in:
        return np.eye(n_in)
    from scipy.ndimage import map_coordinates

    source = map_coordinates(
        np.arange(n_in, dtype=np.float64), _coordinates(n_out, n_in)[None], order=0, mode="nearest"
    )
    matrix = np.zeros((n_out, n_in))
    matrix[np.arange(n_out), np.rint(source).astype(np.int64)] = 1.0
    return matrix


@dataclass(frozen=True)
class ExportGeometry:
    """nnU-Net's export from the preprocessed grid to the original image, as linear maps.

    Attributes:
        preprocessed: the preprocessed (network) grid's shape, transposed axes.
        cropped: the crop box's shape, transposed axes (``shape_after_cropping...``).
        before_cropping: the transposed original shape.
        bbox: the crop box, per transposed axis (start, stop).
        transpose_backward: the axis order back to the original array.
        matrices: one (cropped, preprocessed) resampling matrix per axis (float64).
        separate_z_axis: the axis resampled on its own (anisotropic data), else None.
    """

    preprocessed: tuple[int, ...]
    cropped: tuple[int, ...]
    before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    transpose_backward: tuple[int, ...]
    matrices: tuple[np.ndarray, ...] = field(repr=False)
    separate_z_axis: int | None = None

    @property
    def original(self) -> tuple[int, ...]:
        """The original array's shape (as nnU-Net's reader returns it)."""
        return tuple(self.before_cropping[axis] for axis in self.transpose_backward)

    @property
    def transpose_forward(self) -> tuple[int, ...]:
        """The axis order from the original array to the preprocessed one."""
        return tuple(int(i) for i in np.argsort(self.transpose_backward))

    def _apply(self, values: torch.Tensor, transposed: bool) -> torch.Tensor:
        for axis, matrix in enumerate(self.matrices):
            if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(len(matrix))):
                continue
            weights = torch.from_numpy(matrix.T if transposed else matrix).to(values)
            moved = values.movedim(axis + 1, -1)
            values = (moved @ weights.T).movedim(-1, axis + 1)
        return values

    def to_original(self, values: torch.Tensor) -> torch.Tensor:
        """(C, *preprocessed) -> (C, *original): resample, zeros outside the crop box, transpose."""
        cropped = self._apply(values, transposed=False)
        full = cropped.new_zeros((cropped.shape[0], *self.before_cropping))
        full[(slice(None), *(slice(a, b) for a, b in self.bbox))] = cropped
        return full.permute(0, *(axis + 1 for axis in self.transpose_backward))

    def from_original(self, values: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`to_original`: (C, *original) -> (C, *preprocessed)."""
        transposed = values.permute(0, *(axis + 1 for axis in self.transpose_forward))
        cropped = transposed[(slice(None), *(slice(a, b) for a, b in self.bbox))]
        return self._apply(cropped, transposed=True)

    def insert(self, cropped: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(C, *cropped) values on the crop box -> (C, *original), ``fill`` outside, transposed."""
        full = cropped.new_full((cropped.shape[0], *self.before_cropping), fill)
        full[(slice(None), *(slice(a, b) for a, b in self.bbox))] = cropped
        return full.permute(0, *(axis + 1 for axis in self.transpose_backward))


def separate_z(
    kwargs: dict[str, Any], current: list[float], spacing: list[float]
) -> tuple[bool, int | None]:
    """Whether nnU-Net resamples the low-resolution axis on its own, and which axis it is.

    nnunetv2 2.5 and later decide it in ``determine_do_sep_z_and_axis``; 2.4 decided it inside
    ``resample_data_or_seg_to_shape`` (the same rule, with ``force_separate_z`` False when the
    plans do not give it) and returned the axis as an array.
    """
    resampling = importlib.import_module("nnunetv2.preprocessing.resampling.default_resampling")
    decide = getattr(resampling, "determine_do_sep_z_and_axis", None)
    if decide is not None:
        separate, axis = decide(kwargs.get("force_separate_z"), current, spacing)
        return bool(separate), None if axis is None else int(axis)
    force = kwargs.get("force_separate_z", False)
    threshold = resampling.ANISO_THRESHOLD
    axes = None
    if force is not None:
        separate = bool(force)
        axes = resampling.get_lowres_axis(current) if force else None
    elif resampling.get_do_separate_z(current, threshold):
        separate, axes = True, resampling.get_lowres_axis(current)
    elif resampling.get_do_separate_z(spacing, threshold):
        separate, axes = True, resampling.get_lowres_axis(spacing)
    else:
        separate = False
    if axes is None or len(axes) != 1:  # no axis, or two or three of one spacing
        return False, None
    return separate, int(axes[0])


def export_geometry(
    plans_manager: Any,
    configuration_manager: Any,
    properties: dict[str, Any],
    preprocessed: Sequence[int],
) -> ExportGeometry:
    """The export of one case, read from its preprocessing ``properties`` and the plans.

    Raises:
        NnUNetError: a probability resampling that is not linear (order other than 1, or order_z
            other than 0 or 1): its clipping makes the exported logits a non-linear function.
    """
    kwargs = dict(configuration_manager.configuration.get("resampling_fn_probabilities_kwargs", {}))
    function = configuration_manager.configuration.get("resampling_fn_probabilities")
    order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
    if function != "resample_data_or_seg_to_shape" or order != 1 or order_z not in (0, 1):
        raise NnUNetError(
            f"the plans resample probabilities with {function} (order {order}, order_z "
            f"{order_z}); segcam explains nnU-Net's linear export (resample_data_or_seg_to_shape, "
            f"order 1, order_z 0 or 1) exactly, and this one is not linear"
        )
    transpose_forward = [int(i) for i in plans_manager.transpose_forward]
    spacing = [float(properties["spacing"][i]) for i in transpose_forward]
    cropped = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    current = list(configuration_manager.spacing)
    if len(current) != len(cropped):  # a 2D configuration: the slice axis keeps its spacing
        current = [spacing[0], *current]
    separate, axis = separate_z(kwargs, current, spacing)
    preprocessed = tuple(int(s) for s in preprocessed)
    matrices = []
    for k, (n_out, n_in) in enumerate(zip(cropped, preprocessed, strict=True)):
        if separate and k == axis and order_z == 0:
            matrices.append(nearest_matrix(n_out, n_in))
        else:
            matrices.append(linear_matrix(n_out, n_in))
    bbox = tuple((int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])
    return ExportGeometry(
        preprocessed=preprocessed,
        cropped=cropped,
        before_cropping=tuple(int(s) for s in properties["shape_before_cropping"]),
        bbox=bbox,
        transpose_backward=tuple(int(i) for i in plans_manager.transpose_backward),
        matrices=tuple(matrices),
        separate_z_axis=int(axis) if separate and axis is not None else None,
    )
