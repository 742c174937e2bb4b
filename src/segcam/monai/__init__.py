"""MONAI bundles in segcam (the ``[monai]`` extra; MONAI is imported only here, on use).

- :func:`load_bundle` reads a bundle folder in the Model Zoo's layout (``configs/inference.json``
  or ``.yaml``, ``models/model.pt``) with MONAI's own ``ConfigParser``: the network with its
  weights, the preprocessing, the inferer and the postprocessing, nothing re-typed
  (:mod:`segcam.monai.bundle`).
- :func:`read_case` runs the bundle's preprocessing on an image, :func:`predict` its inferer and
  postprocessing (the segmentation ``monai.bundle.run`` writes), and the ``Invertd`` that
  brings values back to the original image is the linear export E
  (:mod:`segcam.monai.pipeline`).
- :func:`explain` / :func:`explain_methods` explain the bundle's prediction exactly, on the
  original image's grid: the score is the masked sum of the logits brought back by E
  (:mod:`segcam.monai.explain`).
"""

from segcam.monai.bundle import BundleError, MonaiBundle, load_bundle
from segcam.monai.explain import explain, explain_and_predict, explain_methods
from segcam.monai.pipeline import BundleCase, BundlePrediction, predict, read_case

__all__ = [
    "BundleCase",
    "BundleError",
    "BundlePrediction",
    "MonaiBundle",
    "explain",
    "explain_and_predict",
    "explain_methods",
    "load_bundle",
    "predict",
    "read_case",
]
