"""The one naming scheme of map files, for every application that writes them.

A map file is named ``METHOD__LAYER__t<i>-KIND-CLASS<suffix>``:

- ``METHOD``: the registered method (``seg-hires-grad-cam``);
- ``LAYER``: the explained layer's module name (``decoder.stages.4``);
- ``t<i>``: the target's position among the run's targets, from 0;
- ``KIND``: the target's kind as the command line writes it (``predicted``, ``mask``, ``box``,
  ``pixel``, ``all``, ``probability``, ``region``; the viewer adds ``uploaded``);
- ``CLASS``: the class's name where one is known (``--classes``, ``dataset.json``, the demo's
  labels), else its index;

each part with anything but ASCII letters, digits, ``-``, ``_``, ``.`` and ``+`` replaced by ``_``,
and cut to :data:`MAX_PART` characters (with a hash of the whole) when longer. The suffix
is the format's (``.nii.gz``, ``.nrrd``, ``.mha``, ``.png``, ...). The command line, the batch,
nnU-Net cases, the demo and the viewer's exports all name their maps so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "MAX_PART",
    "folder_name",
    "map_stem",
    "method_file_name",
    "printable",
    "safe_name",
    "spec_class_name",
]

MAX_PART = 60
"""Characters a part of a map name keeps; a longer one is cut and ends in 8 hex of its SHA-256."""

_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+")


def safe_name(name: str) -> str:
    """ASCII letters, digits, ``-``, ``_``, ``.`` and ``+`` kept, anything else ``_``.

    Empty: ``root`` (the model itself, as a layer). Longer than :data:`MAX_PART`: cut, with
    ``~`` and 8 hex digits of the whole name's SHA-256 (two long names stay apart), so that a
    map's name stays far below the 255 bytes a file system allows. ASCII only, so the name is
    the same on every file system and in an HTTP download.
    """
    safe = "".join(c if c in _KEPT else "_" for c in name) or "root"
    if len(safe) <= MAX_PART:
        return safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe[: MAX_PART - 9]}~{digest}"


def method_file_name(method: str) -> str:
    """A method's part of a file name (``<method>.npz``, a map's first part): never hidden."""
    safe = safe_name(method)
    return safe if not safe.startswith(".") else f"_{safe}"


def folder_name(name: str) -> str:
    """An input's output folder name: letters, digits, ``-_.`` kept, never empty nor hidden.

    So the folder always lies inside ``--out``.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe if safe and not safe.startswith(".") else f"_{safe}"


def map_stem(method: str, layer: str, index: int, kind: str, class_name: str) -> str:
    """A map file's name without its suffix: ``METHOD__LAYER__t<i>-KIND-CLASS``."""
    return (
        f"{method_file_name(method)}__{safe_name(layer)}__t{index}-{safe_name(kind)}-"
        f"{safe_name(class_name)}"
    )


def spec_class_name(spec: str, classes: Sequence[str]) -> tuple[str, str]:
    """(kind, class name) of a ``--target`` spec: ``predicted:1`` with classes -> the name.

    The index stays where the class has no (or an empty) name.
    """
    kind, _, rest = spec.partition(":")
    class_text = rest.partition(":")[0]
    if class_text.isdigit() and int(class_text) < len(classes) and classes[int(class_text)]:
        class_text = classes[int(class_text)]
    return kind, class_text


def printable(text: object) -> str:
    """``text`` for one line of a report: control characters (a newline in a file name) escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
