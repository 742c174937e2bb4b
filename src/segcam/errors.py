"""Exceptions and warnings raised by segcam.

Every error names the offending value and, where there is one, the fix. All of them derive from
:class:`SegCamError`, so ``except segcam.errors.SegCamError`` catches exactly segcam's own errors,
and each also derives from the built-in type a caller would expect (``ValueError``, ``KeyError``,
``IndexError``, ``TypeError``).
"""

from __future__ import annotations

import sys

__all__ = [
    "ClassIndexError",
    "ExplanationFileError",
    "ForwardReleasedError",
    "GraphTooLargeError",
    "InputError",
    "InputFileError",
    "LayerError",
    "LayerNotFoundError",
    "LayerNotOnPathError",
    "MaskShapeError",
    "MethodNotFoundError",
    "MethodNotSupportedError",
    "MethodRegistrationError",
    "MetricError",
    "MissingExtraError",
    "ModelError",
    "MrcError",
    "NonFiniteError",
    "OptionError",
    "OutputError",
    "OutputFileError",
    "SegCamError",
    "SegCamWarning",
    "TargetError",
    "user_stacklevel",
]


class SegCamError(Exception):
    """Base class of every error segcam raises on purpose."""


class InputError(SegCamError, ValueError):
    """The input tensor has the wrong rank, dtype, or holds NaN/Inf."""


class NonFiniteError(SegCamError, ValueError):
    """The input or the model's logits hold NaN or Inf."""


class LayerNotFoundError(SegCamError, KeyError):
    """A layer name does not exist in the model, or a module is not part of it."""

    def __str__(self) -> str:
        # KeyError quotes its argument; show the message as written.
        return str(self.args[0]) if self.args else ""


class LayerError(SegCamError, ValueError):
    """A layer exists but cannot be explained: not called, called twice, or its output unusable."""


class LayerNotOnPathError(LayerError):
    """The model's output does not depend on the layer's output."""


class ModelError(SegCamError, RuntimeError):
    """The user's model raised while segcam ran it; the original error is chained.

    The message names the input (shape, dtype, device) and, where it explains the failure, what
    the model's first layer expects.
    """


class OutputError(SegCamError, TypeError):
    """The model's output cannot be turned into logits (N, K, *S) without a clearer ``output=``."""


class TargetError(SegCamError, ValueError):
    """A target does not fit this output: class out of range, mask of the wrong shape, bad index."""


class ClassIndexError(TargetError, IndexError):
    """A target's class index is outside the model's classes."""


class MaskShapeError(TargetError):
    """A pixel set does not have the output's spatial shape."""


class MetricError(SegCamError, ValueError):
    """Inputs a metric cannot be computed on: mismatched shapes, an empty region."""


class MethodNotFoundError(SegCamError, KeyError):
    """No method is registered under that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MethodRegistrationError(SegCamError, ValueError):
    """A method cannot be registered: a taken name, an unknown kind, an option without default."""


class MethodNotSupportedError(SegCamError, ValueError):
    """The method cannot do what was asked (a gradient-free method with sliding windows)."""


class OptionError(SegCamError, ValueError):
    """An option has an unknown name or a value out of its range.

    A method's option, ``normalize``, a sliding window's ``overlap``; raised before any forward
    pass.
    """


class ForwardReleasedError(SegCamError, RuntimeError):
    """The recorded forward pass was released (or never run): run a new forward first."""


class GraphTooLargeError(SegCamError, MemoryError):
    """The kept forward graph would exceed ``max_graph_bytes``."""


class ExplanationFileError(SegCamError, OSError):
    """An explanation file cannot be read or written."""


class InputFileError(SegCamError, ValueError):
    """An input file is missing, unreadable, corrupt, or of an unsupported kind."""


class OutputFileError(SegCamError, OSError):
    """An output file or folder cannot be created or written; the message names the path.

    Permissions, a file where a folder should be, a full disk.
    """


class MrcError(InputFileError):
    """The bytes are not a readable MRC volume."""


class MissingExtraError(SegCamError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class SegCamWarning(UserWarning):
    """Soft problems: an empty pixel set, a model left in training mode."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that points at the caller outside segcam.

    Call it from the function that warns: the count starts at that function's frame.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("segcam."):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
