"""Recorded forwards kept within a byte budget: a later pass needs only its partial backwards.

A driver over many windows (sliding windows, nnU-Net's windows, folds and mirrorings) records
each window's forward (the layers' activations and the graph from them to the logits). Kept,
such a forward serves a later backward pass without running the network again: the targets of
a sliding-window prediction are known only once every window has run, and an interactive
session asks for new targets on the same layers again and again. The bytes a forward holds are
estimated from the tensors its graph saves (a pack hook), its input, logits and activations.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segcam.outputs import OutputSpec
from segcam.recording import RecordedForward, record_forward

__all__ = ["KEEP_BYTES", "KeepBudget", "KeptWindows"]

KEEP_BYTES = 2 * 1024**3  # default budget of kept window graphs (activations and saved tensors)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


@dataclass
class KeepBudget:
    """The bytes that kept forwards may hold, shared by the stores of several layer choices."""

    limit: int = KEEP_BYTES
    used: int = 0


@dataclass
class KeptWindows:
    """Recorded forwards kept per key (a window group, an nnU-Net window) for one layer choice.

    A forward is kept while the estimated bytes of all stores sharing ``budget`` (each
    forward's activations, logits, input and every tensor its graph saves) stay within its
    limit; beyond it, forwards are recorded and freed as without a store. :meth:`close` frees
    them all and gives their bytes back.
    """

    budget: KeepBudget = field(default_factory=KeepBudget)
    forwards: dict[Hashable, RecordedForward] = field(default_factory=dict, repr=False)
    bytes: int = 0
    last_size: int = 0  # the estimated bytes of the forward recorded last

    def record(
        self,
        key: Hashable,
        network: nn.Module,
        x: torch.Tensor,
        layer: Any,
        output: OutputSpec = None,
    ) -> tuple[RecordedForward, bool]:
        """Record a forward and keep it under ``key`` if the budget allows (then True)."""
        saved: dict[tuple[int, int], int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[tensor.data_ptr(), tensor.numel()] = _tensor_bytes(tensor)
            # detached: the tensor itself would make a reference cycle through the retained
            # C++ graph that the garbage collector cannot see (freed stores stayed in memory)
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            recorded = record_forward(network, x, layer, output)
        size = sum(saved.values()) + _tensor_bytes(x) + _tensor_bytes(recorded.logits)
        size += sum(_tensor_bytes(a) for a in recorded.activations)
        self.last_size = size
        if self.budget.used + size > self.budget.limit:
            return recorded, False
        self.forwards[key] = recorded
        self.bytes += size
        self.budget.used += size
        return recorded, True

    def close(self) -> None:
        """Free every kept forward."""
        for recorded in self.forwards.values():
            recorded.release()
        self.forwards.clear()
        self.budget.used -= self.bytes
        self.bytes = 0
