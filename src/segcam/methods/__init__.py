"""segcam's methods: the registry (:mod:`segcam.methods.registry`) and one module per family.

:mod:`segcam.methods.gradient` holds the gradient CAMs (Seg-HiRes-Grad CAM, Seg-Grad CAM and
the ones transferred from classification), :mod:`segcam.methods.gradient_free` Eigen-CAM and
Score-CAM. Importing this package fills the registry; register your own with
:func:`register`.
"""

from segcam.methods import gradient as gradient
from segcam.methods import gradient_free as gradient_free
from segcam.methods import registry
from segcam.methods.registry import *  # noqa: F403  (the registry's public names, listed there)

__all__ = list(registry.__all__)
