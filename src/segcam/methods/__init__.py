"""segcam's methods: the registry (:mod:`segcam.methods.registry`) and one module per family.

:mod:`segcam.methods.gradient` holds the gradient CAMs (Seg-HiRes-Grad CAM, Seg-Grad CAM and
the ones transferred from classification), :mod:`segcam.methods.gradient_free` Eigen-CAM and
Score-CAM. Importing this package fills the registry; register your own with
:func:`register`.
"""

from segcam.methods import gradient as gradient
from segcam.methods import gradient_free as gradient_free
from segcam.methods.registry import (
    REGISTRY,
    GradientFreeMapFunction,
    GradientMapFunction,
    Method,
    MethodContext,
    MethodKind,
    MethodOptions,
    OptionValidator,
    check_positive_int,
    get_method,
    list_methods,
    register,
    resolve_methods,
    resolve_options,
)

__all__ = [
    "REGISTRY",
    "GradientFreeMapFunction",
    "GradientMapFunction",
    "Method",
    "MethodContext",
    "MethodKind",
    "MethodOptions",
    "OptionValidator",
    "check_positive_int",
    "get_method",
    "list_methods",
    "register",
    "resolve_methods",
    "resolve_options",
]
