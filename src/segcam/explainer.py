"""Re-targeting without a new forward pass: one forward, then a partial backward per request.

An interactive user changes the pixel set M again and again on the same input. ``explain`` would
run the forward pass each time; an :class:`Explainer` keeps the graph from the hooked layers to
the logits, so a new target costs only its backward pass from the logits to the layer::

    with segcam.Explainer(model, "model.1.submodule") as explainer:
        explainer.forward(x)
        first = explainer.explain(segcam.Predicted(1))
        second = explainer.explain(segcam.Box(2, [(10, 40), (20, 60)]))
    # the graph is freed here

Memory: one forward's graph at a time, from the first hooked layer on (nothing upstream is
kept). ``forward`` on a new input frees the previous graph first; ``max_graph_bytes`` refuses a
graph larger than a budget; ``close`` (or leaving the ``with`` block) frees it explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segcam.core import explain_recorded
from segcam.errors import ForwardReleasedError, GraphTooLargeError, OptionError
from segcam.explanation import Explanation
from segcam.layers import LayerSpec
from segcam.memory_format import MemoryFormat, check_memory_format, convolution_layout
from segcam.methods import MethodOptions, get_method, resolve_methods
from segcam.outputs import OutputSpec
from segcam.postprocess import Normalization, check_postprocess
from segcam.recording import RecordedForward, record_forward
from segcam.targets import TargetLike, as_target_list

__all__ = ["Explainer", "GraphTooLargeError"]


class Explainer:
    """Explain one input for many targets: a forward once, a partial backward per target.

    Args:
        model, layer, output: as for :func:`segcam.explain`.
        method, relu, upsample, normalize: defaults for :meth:`explain` (each call may override).
        max_graph_bytes: refuse (and free) a forward whose tensors saved for backward exceed this.
        memory_format: the convolutions' memory layout for the forward and for gradient-free
            methods' forwards (:mod:`segcam.memory_format`).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | Sequence[LayerSpec],
        method: str = "seg-hires-grad-cam",
        *,
        relu: bool = True,
        upsample: bool = True,
        normalize: Normalization | None = None,
        output: OutputSpec = None,
        max_graph_bytes: int | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        get_method(method)
        self.memory_format = check_memory_format(memory_format)
        check_postprocess(normalize)
        if max_graph_bytes is not None and (
            isinstance(max_graph_bytes, bool)
            or not isinstance(max_graph_bytes, int)
            or max_graph_bytes < 0
        ):
            raise OptionError(
                f"max_graph_bytes must be None or a number of bytes (int >= 0); got "
                f"{max_graph_bytes!r}"
            )
        self.model = model
        self.layer = layer
        self.method = method
        self.relu, self.upsample, self.normalize = relu, upsample, normalize
        self.output = output
        self.max_graph_bytes = max_graph_bytes
        self._recorded: RecordedForward | None = None
        self.graph_bytes = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model on ``inputs`` (freeing any earlier graph); return the detached logits."""
        self.close()
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        # a snapshot: later targets (Score-CAM's masked inputs) must not see the caller's
        # in-place changes to x
        snapshot = inputs.detach().clone() if isinstance(inputs, torch.Tensor) else inputs
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            recorded = record_forward(
                self.model, snapshot, self.layer, self.output, self.memory_format
            )
        self.graph_bytes = sum(storages.values())
        if self.max_graph_bytes is not None and self.graph_bytes > self.max_graph_bytes:
            recorded.release()
            raise GraphTooLargeError(
                f"the forward graph holds {self.graph_bytes / 2**20:.1f} MiB of saved tensors, "
                f"over max_graph_bytes={self.max_graph_bytes / 2**20:.1f} MiB; explain a deeper "
                f"layer, a smaller input, or use segcam.explain"
            )
        self._recorded = recorded
        return recorded.logits

    @property
    def logits(self) -> torch.Tensor:
        """The detached logits of the current forward pass."""
        return self._current().logits

    def _current(self) -> RecordedForward:
        if self._recorded is None:
            raise ForwardReleasedError(
                "no forward pass is kept: call forward(x) first (or it was closed)"
            )
        return self._recorded

    def explain(
        self,
        targets: TargetLike | Sequence[TargetLike],
        method: str | None = None,
        *,
        relu: bool | None = None,
        upsample: bool | None = None,
        normalize: Normalization | str | None = "default",
        method_options: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """Maps for ``targets`` from the kept forward pass: one backward pass per target.

        ``method_options`` are the method's options, as for :func:`segcam.explain`. A
        gradient-free method runs on the kept activations (seg-score-cam also runs the model on
        masked inputs).
        """
        chosen = method or self.method
        options = {chosen: method_options} if method_options is not None else None
        return self.explain_methods(
            targets,
            [chosen],
            relu=relu,
            upsample=upsample,
            normalize=normalize,
            method_options=options,
        )[chosen]

    def explain_methods(
        self,
        targets: TargetLike | Sequence[TargetLike],
        methods: Sequence[str],
        *,
        relu: bool | None = None,
        upsample: bool | None = None,
        normalize: Normalization | str | None = "default",
        method_options: MethodOptions | None = None,
    ) -> dict[str, Explanation]:
        """Maps for ``targets`` by several methods at once: method name -> explanation.

        The gradient methods share one backward pass per target (side-by-side views cost one
        backward, not one per method); ``method_options`` maps a method to its options.
        """
        chosen = resolve_methods(methods, method_options)
        norm: Any = self.normalize if normalize == "default" else normalize
        check_postprocess(norm)
        target_list = as_target_list(targets)
        recorded = self._current()
        with convolution_layout(self.model, recorded.inputs, self.memory_format):
            return explain_recorded(
                recorded,
                target_list,
                chosen,
                relu=self.relu if relu is None else relu,
                upsample=self.upsample if upsample is None else upsample,
                normalize=norm,
                keep_graph=True,
            )

    def close(self) -> None:
        """Free the kept graph; the explainer can run a new forward afterwards."""
        if self._recorded is not None:
            self._recorded.release()
            self._recorded = None
        self.graph_bytes = 0

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
