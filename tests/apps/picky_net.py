"""A network that refuses inputs of another width than 16 (for model-error tests)."""

from __future__ import annotations

import torch


class Picky(torch.nn.Module):
    """Two convolutions; raises for an input whose last axis is not 16 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 16:
            raise RuntimeError("needs 16 pixels")
        return self.head(self.body(x))


def picky() -> Picky:
    return Picky()
