"""The one naming scheme of map files, for every application that writes them.

A map file is named ``METHOD__LAYER__t<i>-KIND-CLASS<suffix>``:

- ``METHOD``: the registered method (``seg-hires-grad-cam``);
- ``LAYER``: the explained layer's module name (``decoder.stages.4``);
- ``t<i>``: the target's position among the run's targets, from 0;
- ``KIND``: the target's kind as the command line writes it (``predicted``, ``mask``, ``box``,
  ``pixel``, ``all``, ``probability``, ``region``; the viewer adds ``uploaded``);
- ``CLASS``: the class's name where one is known (``--classes``, ``dataset.json``, the demo's
  labels), else its index;

each part with anything but letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``. The suffix
is the format's (``.nii.gz``, ``.nrrd``, ``.mha``, ``.png``, ...). The command line, the batch,
nnU-Net cases, the demo and the viewer's exports all name their maps so.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["folder_name", "map_stem", "safe_name", "spec_class_name"]


def safe_name(name: str) -> str:
    """Letters, digits, ``-``, ``_`` and ``.`` kept, anything else ``_`` (``root`` if empty)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "root"


def folder_name(name: str) -> str:
    """An input's output folder name: as :func:`safe_name`, never empty nor starting with a dot.

    So the folder always lies inside ``--out``.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe if safe and not safe.startswith(".") else f"_{safe}"


def map_stem(method: str, layer: str, index: int, kind: str, class_name: str) -> str:
    """A map file's name without its suffix: ``METHOD__LAYER__t<i>-KIND-CLASS``."""
    return f"{method}__{safe_name(layer)}__t{index}-{safe_name(kind)}-{safe_name(class_name)}"


def spec_class_name(spec: str, classes: Sequence[str]) -> tuple[str, str]:
    """(kind, class name) of a ``--target`` spec: ``predicted:1`` with classes -> the name."""
    kind, _, rest = spec.partition(":")
    class_text = rest.partition(":")[0]
    if class_text.isdigit() and int(class_text) < len(classes):
        class_text = classes[int(class_text)]
    return kind, class_text
