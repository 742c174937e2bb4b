"""The layers the viewer offers: found on the model's path, labelled by depth, one chosen first.

A layer is offered when it runs once, lies on the path to the output and returns a map of the
input's rank with more channels than the model has classes; norm, dropout, activation and
identity modules (and a module its wrapper returns unchanged) are listed but hidden by default.
Labels say where a layer sits in any encoder-decoder (``encoder 2``, ``bottleneck``,
``decoder 1``); the first layer shown is the last decoder layer at the finest grid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcam.errors import LayerNotOnPathError, OptionError
from segcam.layers import LayerInfo

__all__ = ["LayerMenu", "depth_labels", "is_plumbing", "on_path_shapes"]

_PLUMBING = re.compile(
    r"(Norm|Dropout|ReLU|ELU|GELU|SiLU|Sigmoid|Softmax|Tanh|Identity|PReLU|Mish|Hardswish"
    r"|Flatten|Pad)\w*$|^ADN$"
)


def is_plumbing(type_name: str) -> bool:
    """Norm, dropout, activation and identity modules: they add no block of their own."""
    return bool(_PLUMBING.search(type_name))


def depth_labels(
    names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], spatial: Sequence[int]
) -> dict[str, str]:
    """Readable names for any encoder-decoder: ``encoder 1`` ... ``bottleneck`` ... ``decoder 1``.

    ``names`` in execution order; a layer's depth is how many halvings its grid is below the
    input's (``round(log2(input voxels / layer voxels) / dims)``). Layers before the deepest
    one are the encoder, those after it the decoder; several layers at one depth are numbered
    (``encoder 2 #1``, ``#2``).
    """
    dims = len(spatial)
    whole = float(np.prod(spatial))
    depth = {}
    for name in names:
        size = float(np.prod(shapes[name][2:])) or 1.0
        depth[name] = max(0, round(float(np.log2(max(whole / size, 1.0))) / dims))
    if not depth:
        return {}
    deepest = max(depth.values())
    part, seen_deepest = {}, False
    for name in names:
        if deepest == 0:
            part[name] = "block"
        elif depth[name] == deepest:
            part[name], seen_deepest = "bottleneck", True
        else:
            part[name] = f"{'decoder' if seen_deepest else 'encoder'} {depth[name]}"
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(part[name], []).append(name)
    labels = {}
    for group, members in groups.items():
        for k, name in enumerate(members, 1):
            labels[name] = group if len(members) == 1 else f"{group} #{k}"
    return labels


def on_path_shapes(table: Sequence[LayerInfo]) -> dict[str, tuple[int, ...]]:
    """Layer -> output shape of every named module that runs once on the path to the output."""
    return {
        info.name: info.shape
        for info in table
        if info.on_path and info.shape is not None and info.calls == 1 and info.name
    }


@dataclass
class LayerMenu:
    """The layers of the viewer's menu, from one forward's layer table.

    Attributes:
        shapes: every on-path layer that runs once -> its output shape.
        hidden: the plumbing among them (not offered unless asked for).
        all_layers: those of the input's rank (any may be requested).
        offered: the layers offered (given, or found as the module docstring says).
        labels: layer -> readable label.
        default: the layer shown first.
    """

    shapes: dict[str, tuple[int, ...]]
    hidden: set[str]
    all_layers: list[str]
    offered: list[str]
    labels: Mapping[str, str]
    default: str

    @classmethod
    def build(
        cls,
        table: Sequence[LayerInfo],
        spatial: tuple[int, ...],
        classes: int,
        offered: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        default: str | None = None,
    ) -> LayerMenu:
        """The menu of a model whose forward ``table`` (:func:`segcam.layers.describe_layers`)."""
        table = sorted(table, key=lambda info: info.order)
        shapes = on_path_shapes(table)
        rank = len(spatial) + 2
        kinds = {info.name: info.type_name for info in table}
        wrapped = {info.name for info in table if info.same_as}  # a block returns it as is
        hidden = {n for n in shapes if is_plumbing(kinds.get(n, "")) or n in wrapped}
        all_layers = [n for n, s in shapes.items() if len(s) == rank]
        chosen = (
            list(offered)
            or [n for n in all_layers if shapes[n][1] > classes and n not in hidden]
            or list(all_layers)
        )
        unknown = [name for name in chosen if name not in shapes]
        if unknown:
            raise LayerNotOnPathError(f"layers not on the model's path (or unknown): {unknown}")
        if not labels:
            shown = [n for n in all_layers if n not in hidden or n in chosen]
            labels = depth_labels(shown, shapes, spatial)
        default = default if default is not None else _sensible_layer(chosen, labels)
        if default not in chosen:
            raise OptionError(f"default layer {default!r} is not among the layers")
        return cls(shapes, hidden, all_layers, chosen, dict(labels), default)

    def entry(self, name: str) -> dict[str, Any]:
        """The page's description of one layer."""
        return {"name": name, "shape": list(self.shapes[name]), "label": self.labels.get(name, "")}

    def describe(self) -> dict[str, Any]:
        """The ``info`` fields of the menu: offered layers, the others, the default."""
        return {
            "layers": [self.entry(name) for name in self.offered],
            "all_layers": [
                {**self.entry(name), "hidden": name in self.hidden}
                for name in self.all_layers
                if name not in self.offered
            ],
            "default_layer": self.default,
        }


def _sensible_layer(layers: Sequence[str], labels: Mapping[str, str]) -> str:
    """The last decoder layer (fine grid, semantic features), else the middle of the list."""
    decoders = [n for n in layers if labels.get(n, "").startswith("decoder")]
    if decoders:
        finest = min(int(labels[n].split()[1]) for n in decoders)
        return [n for n in decoders if int(labels[n].split()[1]) == finest][-1]
    return layers[len(layers) // 2]
