r"""``explain`` and ``explain_methods``: one forward pass, one backward pass per target.

Maps are per sample: the samples of a batch never mix. Everything here goes through the single
gradient path of :mod:`segcam.recording`; :func:`method_maps` is the one loop from layer gradients
to method maps (shared with :mod:`segcam.sliding`), and :func:`explain_recorded` turns a
recorded forward and targets into explanations (shared with :class:`segcam.Explainer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segcam.errors import OptionError
from segcam.explanation import Explanation, assemble
from segcam.layers import LayerSpec
from segcam.methods import Method, MethodContext, MethodOptions, resolve_methods
from segcam.outputs import OutputSpec
from segcam.postprocess import Normalization, PostProcessing, check_postprocess
from segcam.recording import RecordedForward, record_forward
from segcam.targets import (
    TargetLike,
    as_target_list,
    score_gradient,
    target_pixel_sets,
)

__all__ = [
    "OutputSpec",
    "Progress",
    "explain",
    "explain_methods",
    "explain_recorded",
    "method_maps",
]

Progress = Callable[[int, int], None]
"""Called with (done, total) as work advances: targets of an input, or groups of windows."""


def method_maps(
    recorded: RecordedForward,
    score_gradients: Iterable[torch.Tensor],
    methods: Sequence[tuple[Method, Mapping[str, Any]]],
    *,
    keep_graph: bool = False,
) -> Iterator[dict[str, tuple[torch.Tensor, ...]]]:
    """Per score: method name -> one raw map (N, *grid) per layer, from one backward pass.

    The single loop ``autograd.grad -> channels-first -> method`` of segcam: every gradient
    method shares each score's backward pass. ``methods`` must be gradient methods.
    """
    for gradients in recorded.layer_gradients(score_gradients, keep_graph=keep_graph):
        yield {
            method.name: tuple(
                method.compute(activation, gradient, **options)
                for activation, gradient in zip(recorded.activations, gradients, strict=True)
            )
            for method, options in methods
        }


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
        logits = recorded.logits
        pixel_sets = target_pixel_sets(targets, logits)
        stacked_sets = torch.stack(pixel_sets, dim=1)
        nonempty = stacked_sets.flatten(2).any(dim=2)  # (N, T); empty sets: warned at assembly
        active = [t for t in range(len(targets)) if bool(nonempty[:, t].any())]

        raw: dict[str, list[torch.Tensor]] = {}  # method -> per layer (N, T, *grid)
        gradient_methods = [(m, o) for m, o in methods if m.needs_gradient]
        if gradient_methods:
            zero = [a.new_zeros((a.shape[0], *a.shape[2:])) for a in recorded.activations]
            # method -> layer -> target -> (N, *grid); empty targets keep the zero map
            collected = {
                method.name: [[layer_zero] * len(targets) for layer_zero in zero]
                for method, _ in gradient_methods
            }
            score_gradients = (
                score_gradient(logits, targets[t].class_index, pixel_sets[t]) for t in active
            )
            maps_per_target = method_maps(
                recorded, score_gradients, gradient_methods, keep_graph=keep_graph
            )
            for done, (t, maps) in enumerate(zip(active, maps_per_target, strict=True), 1):
                for name, per_layer in maps.items():
                    for index, layer_map in enumerate(per_layer):
                        collected[name][index][t] = layer_map
                if progress is not None:
                    progress(done, len(active))
            for name, per_layer_maps in collected.items():
                raw[name] = [torch.stack(maps, dim=1) for maps in per_layer_maps]
        for method, options in methods:
            if not method.needs_gradient:
                raw[method.name] = _gradient_free_maps(
                    recorded, method, options, targets, pixel_sets, stacked_sets, nonempty
                )
    finally:
        if not keep_graph:
            recorded.release()
    return assemble(
        {
            method.name: dict(zip(recorded.layer_names, raw[method.name], strict=True))
            for method, _ in methods
        },
        {method.name: options for method, options in methods},
        logits=logits,
        pixel_sets=stacked_sets,
        targets=targets,
        post=PostProcessing(relu, upsample, normalize),
        size=recorded.input_size,
        layer_shapes=recorded.layer_shapes,
        inputs=recorded.inputs,
    )


def _gradient_free_maps(
    recorded: RecordedForward,
    method: Method,
    options: Mapping[str, Any],
    targets: Sequence[TargetLike],
    pixel_sets: list[torch.Tensor],
    stacked_sets: torch.Tensor,
    nonempty: torch.Tensor,
) -> list[torch.Tensor]:
    """(N, T, *grid) per layer from a gradient-free method, all targets at once."""
    score = None
    if method.kind == "model":
        weights = torch.stack(
            [
                score_gradient(recorded.logits, target.class_index, pixel_set)
                for target, pixel_set in zip(targets, pixel_sets, strict=True)
            ],
            dim=1,
        )  # (N, T, K, *S): y^c_M = <weights, logits>
        score = recorded.scores(weights)
    context = MethodContext(
        pixel_sets=stacked_sets, nonempty=nonempty, inputs=recorded.inputs, score=score
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
) -> dict[str, Explanation]:
    r"""Explain with several methods at once: method name -> :class:`Explanation`.

    One forward pass for all targets, layers and methods, then one backward pass per non-empty
    target shared by every gradient method: two gradient methods cost one backward per target,
    not two. Arguments as for :func:`explain`; ``method_options`` maps a method name to its
    options. Methods, options and ``normalize`` are checked before the forward pass.
    ``progress`` is called with (targets done, targets with a backward pass) after each one.

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
    recorded = record_forward(model, inputs, layer, output)
    with recorded:
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
    )[method]
