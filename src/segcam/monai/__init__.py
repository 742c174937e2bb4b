"""MONAI bundles in segcam (the ``[monai]`` extra; MONAI is imported only here, on use).

- :func:`load_bundle` reads a bundle folder in the Model Zoo's layout (``configs/inference.json``
  or ``.yaml``, ``models/model.pt``) with MONAI's own ``ConfigParser``: the network with its
  weights, the preprocessing, the inferer and the postprocessing, nothing re-typed
  (:mod:`segcam.monai.bundle`).
"""

from segcam.monai.bundle import BundleError, MonaiBundle, load_bundle

__all__ = ["BundleError", "MonaiBundle", "load_bundle"]
