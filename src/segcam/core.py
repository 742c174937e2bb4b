r"""``explain`` and ``explain_methods``: one forward pass, one backward pass per target.

Maps are per sample: the samples of a batch never mix. Everything here goes through the single
gradient path of :mod:`segcam.recording`; :func:`method_maps` is the one loop from layer gradients
to method maps (shared with :mod:`segcam.sliding`), and :func:`explain_recorded` turns a
recorded forward and targets into explanations (shared with :class:`segcam.Explainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segcam.errors import OptionError
from segcam.explanation import Explanation, assemble
from segcam.layers import LayerSpec
from segcam.memory_format import MemoryFormat, check_memory_format, convolution_layout
from segcam.methods import Method, MethodContext, MethodOptions, resolve_methods
from segcam.outputs import OutputSpec
from segcam.postprocess import Normalization, PostProcessing, check_postprocess
from segcam.recording import RecordedForward, record_forward
from segcam.targets import ResolvedTargets, TargetLike, as_target_list

__all__ = [
    "MapRecord",
    "OutputSpec",
    "Progress",
    "explain",
    "explain_methods",
    "explain_recorded",
    "method_maps",
]

Progress = Callable[[int, int], None]
"""Called with (done, total) as work advances: targets of an input, or groups of windows."""


@dataclass(frozen=True, eq=False)
class MapRecord:
    """One raw map from one backward pass: of target ``target``, by ``method``, at a layer.

    ``layer`` is the layer's position among the recorded layers; ``map`` is (N, *grid).
    """

    target: int
    method: str
    layer: int
    map: torch.Tensor


def method_maps(
    recorded: RecordedForward,
    scores: Iterable[tuple[int, torch.Tensor]],
    methods: Sequence[tuple[Method, Mapping[str, Any]]],
    *,
    keep_graph: bool = False,
) -> Iterator[MapRecord]:
    """The maps of each score's one backward pass, as flat records, target by target.

    ``scores`` are (target index, d score / d logits). The single loop ``autograd.grad ->
    channels-first -> method`` of segcam: every gradient method shares each score's backward
    pass. ``methods`` must be gradient methods.
    """
    order: list[int] = []

    def gradients() -> Iterator[torch.Tensor]:
        for t, gradient in scores:
            order.append(t)
            yield gradient

    passes = recorded.layer_gradients(gradients(), keep_graph=keep_graph)
    for k, layer_gradients in enumerate(passes):
        for method, options in methods:
            for index, (activation, gradient) in enumerate(
                zip(recorded.activations, layer_gradients, strict=True)
            ):
                yield MapRecord(
                    order[k], method.name, index, method.compute(activation, gradient, **options)
                )


def explain_recorded(
    recorded: RecordedForward,
    targets: Sequence[TargetLike],
    methods: Sequence[tuple[Method, Mapping[str, Any]]],
    *,
    relu: bool,
    upsample: bool,
    normalize: Normalization | None,
    keep_graph: bool,
    progress: Progress | None = None,
) -> dict[str, Explanation]:
    """Explanations of ``targets`` by each method from one recorded forward pass.

    One ``autograd.grad`` per non-empty target serves every gradient method; gradient-free
    methods take none. Unless ``keep_graph``, the graph is released at the end (exceptions
    included).
    """
    try:
        resolved = ResolvedTargets.resolve(targets, recorded.logits)
        gradient_methods = [(m, o) for m, o in methods if m.needs_gradient]
        raw = _gradient_maps(recorded, resolved, gradient_methods, keep_graph, progress)
        for method, options in methods:
            if not method.needs_gradient:
                raw[method.name] = _gradient_free_maps(recorded, method, options, resolved)
    finally:
        if not keep_graph:
            recorded.release()
    return assemble(
        {
            method.name: dict(zip(recorded.layer_names, raw[method.name], strict=True))
            for method, _ in methods
        },
        {method.name: options for method, options in methods},
        logits=recorded.logits,
        pixel_sets=resolved.stacked,
        targets=targets,
        post=PostProcessing(relu, upsample, normalize),
        size=recorded.input_size,
        layer_shapes=recorded.layer_shapes,
        inputs=recorded.inputs,
    )


def _gradient_maps(
    recorded: RecordedForward,
    resolved: ResolvedTargets,
    methods: Sequence[tuple[Method, Mapping[str, Any]]],
    keep_graph: bool,
    progress: Progress | None,
) -> dict[str, list[torch.Tensor]]:
    """Method -> per layer (N, T, *grid): one backward pass per active target for all methods."""
    if not methods:
        return {}
    zero = [a.new_zeros((a.shape[0], *a.shape[2:])) for a in recorded.activations]
    # method -> layer -> target -> (N, *grid); empty targets keep the zero map
    collected = {
        method.name: [[layer_zero] * len(resolved.targets) for layer_zero in zero]
        for method, _ in methods
    }
    scores = ((t, resolved.score_gradient(t, recorded.logits)) for t in resolved.active)
    per_target = len(methods) * len(zero)
    records = method_maps(recorded, scores, methods, keep_graph=keep_graph)
    for count, record in enumerate(records, 1):
        collected[record.method][record.layer][record.target] = record.map
        if progress is not None and count % per_target == 0:
            progress(count // per_target, len(resolved.active))
    return {
        name: [torch.stack(maps, dim=1) for maps in per_layer]
        for name, per_layer in collected.items()
    }


def _gradient_free_maps(
    recorded: RecordedForward,
    method: Method,
    options: Mapping[str, Any],
    resolved: ResolvedTargets,
) -> list[torch.Tensor]:
    """(N, T, *grid) per layer from a gradient-free method, all targets at once."""
    score = None
    if method.kind == "model":
        weights = torch.stack(
            [resolved.score_gradient(t, recorded.logits) for t in range(len(resolved.targets))],
            dim=1,
        )  # (N, T, K, *S): y^c_M = <weights, logits>
        score = recorded.scores(weights)
    context = MethodContext(
        pixel_sets=resolved.stacked,
        nonempty=resolved.nonempty,
        inputs=recorded.inputs,
        score=score,
    )
    return [method.compute(activation, context, **options) for activation in recorded.activations]


def explain_methods(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    output: OutputSpec = None,
    method_options: MethodOptions | None = None,
    progress: Progress | None = None,
    memory_format: MemoryFormat = "auto",
) -> dict[str, Explanation]:
    r"""Explain with several methods at once: method name -> :class:`Explanation`.

    One forward pass for all targets, layers and methods, then one backward pass per non-empty
    target shared by every gradient method: two gradient methods cost one backward per target,
    not two. Arguments as for :func:`explain`; ``method_options`` maps a method name to its
    options. Methods, options and ``normalize`` are checked before the forward pass.
    ``progress`` is called with (targets done, targets with a backward pass) after each one.
    ``memory_format``: the convolutions' memory layout (:mod:`segcam.memory_format`).

    Example:
        >>> import segcam, torch
        >>> from segcam.testing import tiny_segnet
        >>> model = tiny_segnet(2).eval()
        >>> maps = segcam.explain_methods(model, torch.rand(1, 1, 16, 16), segcam.Predicted(1),
        ...                               "body.3", ["seg-grad-cam", "seg-hires-grad-cam"])
        >>> sorted(maps)
        ['seg-grad-cam', 'seg-hires-grad-cam']
    """
    chosen = resolve_methods(methods, method_options)
    target_list = as_target_list(targets)
    check_postprocess(normalize)
    layout = check_memory_format(memory_format)
    with (
        convolution_layout(model, inputs, layout),
        record_forward(model, inputs, layer, output) as recorded,
    ):
        return explain_recorded(
            recorded,
            target_list,
            chosen,
            relu=relu,
            upsample=upsample,
            normalize=normalize,
            keep_graph=False,
            progress=progress,
        )


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    method: str = "seg-hires-grad-cam",
    *,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    output: OutputSpec = None,
    method_options: Mapping[str, Any] | None = None,
    memory_format: MemoryFormat = "auto",
) -> Explanation:
    r"""Explain a segmentation network's prediction for each target with a CAM method.

    For every sample n and target t = (c, M), the score is the masked logit sum
    $y^c_M = \sum_{p \in M} y^c_p$ of sample n (raw logits), and the layer's activation
    channels $A_k$ give the raw map

    - ``"seg-hires-grad-cam"`` (Rheude et al., MELBA 2024):
      $L = \sum_k \frac{\partial y^c_M}{\partial A_k} \odot A_k$
    - ``"seg-grad-cam"`` (Vinogradova et al., AAAI 2020):
      $L = \sum_k \operatorname{mean}_p(\frac{\partial y^c_M}{\partial A_k}) A_k$

    (all registered methods: :func:`segcam.list_methods`). The computation is one forward pass
    for all targets and layers, then for a gradient method one backward pass per non-empty
    target from the logits to the hooked activations only (``torch.autograd.grad``: no
    parameter gradients, ``.grad`` untouched); the graph is freed at the end. Gradient-free
    methods take no backward pass (seg-score-cam runs further forwards on masked inputs).
    Samples never mix: each gets its own pixel set and map. The model's hooks, training flag
    and ``requires_grad`` flags are left as they were. Several methods at once:
    :func:`explain_methods`.

    Args:
        model: the segmentation network; its output (selected by ``output``) is (N, K, *S).
            Put it in eval mode first: in training mode BatchNorm mixes the samples of a batch.
        inputs: (N, C, H, W) or (N, C, D, H, W), on the model's device.
        targets: one target or a sequence of T targets (:mod:`segcam.targets`).
        layer: a name from ``model.named_modules()``, a module of the model, a
            :class:`segcam.TokenLayer` (transformer tokens), or a list of them.
        method: a registered method name.
        relu: keep only positive evidence, max(L, 0).
        upsample: resize to the input's spatial size (bilinear 2D, trilinear 3D).
        normalize: ``None``, ``"max"`` or ``"minmax"``, per map; a zero map stays zero.
        output: how to find the logits in the model's output (see
            :func:`segcam.outputs.select_logits`).
        method_options: the method's options (e.g. ``{"pool_size": 4}`` for seg-xres-cam);
            ``segcam methods`` lists them. Checked before the forward pass.
        memory_format: ``"auto"`` (channels-last 3D convolutions for a float32 volume on the
            CPU: oneDNN's fast kernels, the same maps to float32 rounding), ``"channels-last"``
            or ``"contiguous"`` (the plain layout); see :mod:`segcam.memory_format`.

    Returns:
        An :class:`Explanation`; ``.maps`` is (N, T, *S) for a single layer, ``.layer_maps``
        maps each layer name to such a tensor. With ``relu=False, upsample=False,
        normalize=None`` the maps are the raw signed maps at the layer's resolution.

    Raises:
        InputError, NonFiniteError: wrong rank or dtype, or NaN/Inf in the input or the logits.
        LayerNotFoundError, LayerError, LayerNotOnPathError: the layer is unknown, unusable, or
            the output does not depend on it.
        OutputError: the logits cannot be found in the model's output.
        ClassIndexError, MaskShapeError, TargetError: a target does not fit the output.
        MethodNotFoundError, OptionError: unknown method, bad option or ``normalize``.

    Example:
        >>> import segcam, torch
        >>> from segcam.testing import tiny_segnet
        >>> model = tiny_segnet(2).eval()
        >>> expl = segcam.explain(model, torch.rand(2, 1, 16, 16), segcam.Predicted(1), "body.3")
        >>> tuple(expl.maps.shape)
        (2, 1, 16, 16)
    """
    if not isinstance(method, str):
        raise OptionError(
            f"method must be one method name (str); got {method!r} (several: explain_methods)"
        )
    options = {method: method_options} if method_options is not None else None
    return explain_methods(
        model,
        inputs,
        targets,
        layer,
        [method],
        relu=relu,
        upsample=upsample,
        normalize=normalize,
        output=output,
        method_options=options,
        memory_format=memory_format,
    )[method]
