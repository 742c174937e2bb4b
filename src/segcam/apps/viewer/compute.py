"""How the viewer computes: kept forwards per layer, the fast 3D layout, one request at a time.

- :class:`KeptForwards`: an :class:`~segcam.Explainer` per recently used layer (its forward and
  graph kept), so a new pixel set costs one backward pass; the oldest is freed beyond
  :data:`MAX_EXPLAINERS`.
- On the CPU, a float32 volume's 3D convolutions get channels-last inputs (oneDNN's fast
  kernels; the same maps to float32 rounding), unless the model needs contiguous tensors
  (:mod:`segcam.memory_format`, the choice every driver makes).
- :class:`RequestGate`: requests run one at a time under a lock; a newer request of the same
  page cancels an older one still waiting or computing, at the next forward of a module,
  unless it asks for the same work (the same maps on another slice: it waits for them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segcam import Explainer
from segcam.apps.viewer.requests import SupersededError
from segcam.memory_format import MemoryFormat

__all__ = [
    "MAX_EXPLAINERS",
    "KeptForwards",
    "RequestGate",
]

MAX_EXPLAINERS = 3  # kept forwards (one per recently used layer)


@dataclass
class KeptForwards:
    """One kept forward (an :class:`~segcam.Explainer`) per recently used layer."""

    model: nn.Module
    inputs: torch.Tensor  # (1, C, *S)
    output: Any = None
    memory_format: MemoryFormat = "auto"  # channels-last 3D convolutions on the CPU
    explainers: OrderedDict[str, Explainer] = field(default_factory=OrderedDict, repr=False)

    def get(self, layer: str) -> Explainer:
        """The layer's explainer, its forward run now if it is not kept."""
        if layer in self.explainers:
            self.explainers.move_to_end(layer)
            return self.explainers[layer]
        explainer = Explainer(
            self.model,
            layer,
            relu=True,
            upsample=True,
            output=self.output,
            memory_format=self.memory_format,
        )
        explainer.forward(self.inputs)
        self.explainers[layer] = explainer
        while len(self.explainers) > MAX_EXPLAINERS:
            _, old = self.explainers.popitem(last=False)
            old.close()
        return explainer

    def close(self) -> None:
        """Free every kept forward graph."""
        for explainer in self.explainers.values():
            explainer.close()
        self.explainers.clear()


@dataclass
class RequestGate:
    """Requests one at a time; a newer request of the same page supersedes an older one."""

    model: nn.Module
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _latest: dict[str, tuple[int, Any]] = field(default_factory=dict, repr=False)
    _generation: int = field(default=0, repr=False)

    def _next(self, client: str, work: Any = None) -> int:
        with self._guard:
            latest = self._latest.get(client)
            if work is not None and latest is not None and latest[1] == work:
                return latest[0]  # the same work: it goes on, and this request waits for it
            self._generation += 1
            self._latest[client] = (self._generation, work)
            return self._generation

    def cancel(self, client: str) -> None:
        """Cancel the page's pending or computing request (it raises SupersededError)."""
        self._next(client)

    @contextmanager
    def run(self, client: str | None, work: Any = None) -> Iterator[None]:
        """Run a request of ``client`` under the lock; a newer one of the same page cancels it.

        The check runs before every module's forward (gradient-free methods and new layers run
        forward passes; a gradient request is short and ends on its own). ``None`` (an export):
        never cancelled. ``work`` (hashable, optional) names what the request computes: a newer
        request of the same work (the same maps, another slice) does not cancel it.
        """
        if client is None:
            with self._lock:
                yield
            return
        mine = self._next(client, work)

        def check(*_: Any) -> None:
            latest = self._latest.get(client)
            if latest is None or latest[0] != mine:
                raise SupersededError("superseded by a newer request of this page")

        with self._lock:
            check()  # superseded while it waited: it never runs
            # the hooks only while this request runs: a waiting one's check ran inside other
            # pages' forward passes and cancelled them when it was itself superseded
            handles = [m.register_forward_pre_hook(check) for m in self.model.modules()]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
