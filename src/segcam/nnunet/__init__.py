"""nnU-Net v2 models in segcam (the ``[nnunet]`` extra; nnunetv2 is imported only here, on use).

- :func:`load` reads a trained-model folder and builds the networks the way nnU-Net's trainer
  builds them (:mod:`segcam.nnunet.model`).
- :func:`read_case` reads and preprocesses a case with nnU-Net's own code
  (:mod:`segcam.nnunet.case`).
- :func:`predict` is nnU-Net's own prediction and export, without gradients
  (:mod:`segcam.nnunet.predict`, over the windows of :mod:`segcam.nnunet.windows`).
- :func:`explain` / :func:`explain_methods` explain nnU-Net's whole-case prediction exactly, on
  the original image's grid (:mod:`segcam.nnunet.explain`, :mod:`segcam.nnunet.geometry`), for
  targets resolved by :mod:`segcam.nnunet.targets`; :class:`CaseExplainer` does it again and
  again on one case from kept forwards (interactive use, e.g. ``segcam view --nnunet``).
"""

from segcam.nnunet.case import NnUNetCase, read_case
from segcam.nnunet.case_explanation import KEEP_BYTES
from segcam.nnunet.explain import (
    KEPT_LAYERS,
    CaseExplainer,
    explain,
    explain_and_predict,
    explain_methods,
)
from segcam.nnunet.model import NnUNetError, NnUNetModel, load
from segcam.nnunet.predict import NnUNetPrediction, predict

__all__ = [
    "KEEP_BYTES",
    "KEPT_LAYERS",
    "CaseExplainer",
    "NnUNetCase",
    "NnUNetError",
    "NnUNetModel",
    "NnUNetPrediction",
    "explain",
    "explain_and_predict",
    "explain_methods",
    "load",
    "predict",
    "read_case",
]
