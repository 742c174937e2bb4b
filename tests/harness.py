"""Harness for peer libraries and nnU-Net's own code on this CPU-only torch (tests only)."""

from __future__ import annotations

import torch


def fake_torchvision_ops():
    """Define torchvision's two CUDA ops that PyPI's torchvision needs with the CPU torch.

    Test harness only: pytorch-grad-cam imports torchvision, and nnU-Net's own trainer lookup
    imports every trainer variant (some import timm, which imports torchvision).
    """
    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "FRAGMENT")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        fake_torchvision_ops.library = library  # keep the fragment alive


def import_pytorch_grad_cam():
    """Import pytorch-grad-cam; its torchvision import needs two CUDA ops, faked here."""
    fake_torchvision_ops()
    import pytorch_grad_cam

    return pytorch_grad_cam
