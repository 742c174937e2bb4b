"""segcam: class activation maps for semantic segmentation networks, 2D and 3D.

Seg-HiRes-Grad CAM (Rheude, Wirtz, Kuijper, Wesarg, MELBA 2024) and Seg-Grad CAM (Vinogradova,
Dibrov, Myers, AAAI 2020) for any PyTorch segmentation network::

    import segcam
    expl = segcam.explain(model, x, targets=[segcam.Predicted(1)], layer="model.1.submodule")
    expl.maps  # (N, T, *S)
"""

from segcam.core import explain, explain_methods
from segcam.explainer import Explainer
from segcam.explanation import Explanation, load
from segcam.fusion import fuse_layers
from segcam.methods import list_methods
from segcam.outputs import FromProbabilities
from segcam.sliding import explain_sliding_window, explain_sliding_window_methods
from segcam.targets import (
    AllPixels,
    Box,
    Mask,
    Pixel,
    Predicted,
    Probability,
    Region,
    Target,
    Weighted,
)
from segcam.tokens import TokenLayer

__version__ = "0.1.0"

__all__ = [
    "AllPixels",
    "Box",
    "Explainer",
    "Explanation",
    "FromProbabilities",
    "Mask",
    "Pixel",
    "Predicted",
    "Probability",
    "Region",
    "Target",
    "TokenLayer",
    "Weighted",
    "__version__",
    "explain",
    "explain_methods",
    "explain_sliding_window",
    "explain_sliding_window_methods",
    "fuse_layers",
    "list_methods",
    "load",
]
