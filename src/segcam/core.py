"""``explain``: one forward pass, one backward pass per target to the hooked layers.

Maps are per sample: the samples of a batch never mix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segcam.errors import InputError, NonFiniteError, OutputError, SegCamWarning, TargetError
from segcam.explanation import Explanation
from segcam.methods import Method, MethodContext, get_method, resolve_options
from segcam.postprocess import NORMALIZATIONS, Normalization, postprocess
from segcam.recording import LayerRecorder, LayerSpec, layer_list, resolve_layers
from segcam.targets import TargetLike, as_pixel_set, check_class_index
from segcam.tokens import Layout, TokenLayer, infer_layout, to_channels_first

__all__ = ["OutputSpec", "RecordedForward", "explain", "record_forward", "select_logits"]

OutputSpec = str | int | Callable[[Any], torch.Tensor] | None


def _describe_output(raw: Any) -> str:
    if isinstance(raw, torch.Tensor):
        return f"tensor of shape {tuple(raw.shape)}"
    if isinstance(raw, Mapping):
        return f"dict with keys {list(raw)}"
    if isinstance(raw, tuple | list):
        return f"{type(raw).__name__} of {len(raw)} items"
    return type(raw).__name__


def select_logits(raw: Any, output: OutputSpec, input_ndim: int) -> torch.Tensor:
    """Pick the logits (N, K, *S) out of a model's raw output.

    ``output`` may be a key (dict outputs), an index (tuple/list outputs, or the head of a deep
    supervision stack of shape (N, H, K, *S)), or a callable applied to the raw output. ``None``
    accepts a tensor of the input's rank, a dict with an ``"out"`` key (torchvision style) or a
    single tensor value, and a one-item tuple or list; anything else is ambiguous.
    """
    if callable(output):
        selected = output(raw)
    elif isinstance(output, str):
        if not isinstance(raw, Mapping):
            raise OutputError(
                f"output={output!r} is a key, but the model returned {_describe_output(raw)}"
            )
        if output not in raw:
            raise OutputError(f"output key {output!r} not in the model's output keys {list(raw)}")
        selected = raw[output]
    elif isinstance(output, int) and not isinstance(output, bool):
        if isinstance(raw, torch.Tensor) and raw.ndim == input_ndim + 1:
            if not -raw.shape[1] <= output < raw.shape[1]:
                raise OutputError(f"output={output} is outside the {raw.shape[1]} stacked heads")
            selected = raw[:, output]
        elif isinstance(raw, tuple | list):
            if not -len(raw) <= output < len(raw):
                raise OutputError(f"output={output} is outside the model's {len(raw)} outputs")
            selected = raw[output]
        else:
            raise OutputError(
                f"output={output} is an index, but the model returned {_describe_output(raw)}"
            )
    elif output is None:
        selected = _default_logits(raw, input_ndim)
    else:
        raise OutputError(f"output must be None, a key, an index or a callable; got {output!r}")
    if not isinstance(selected, torch.Tensor):
        raise OutputError(f"the selected output is {_describe_output(selected)}, not a tensor")
    if selected.ndim != input_ndim:
        raise OutputError(
            f"the logits must have shape (N, K, *S) with the input's rank {input_ndim}; got "
            f"{tuple(selected.shape)} (for a deep supervision stack pass output=0)"
        )
    if not selected.is_floating_point():
        raise OutputError(f"the logits must be floating point; got {selected.dtype}")
    return selected


def _default_logits(raw: Any, input_ndim: int) -> Any:
    if isinstance(raw, torch.Tensor):
        if raw.ndim == input_ndim + 1:
            raise OutputError(
                f"the model returned a {raw.ndim}-D tensor {tuple(raw.shape)}, one rank more than "
                f"the input: a deep supervision stack? pass output=0 for the first head"
            )
        return raw
    if isinstance(raw, Mapping):
        tensors = [key for key, value in raw.items() if isinstance(value, torch.Tensor)]
        if "out" in raw:
            return raw["out"]
        if len(tensors) == 1:
            return raw[tensors[0]]
        raise OutputError(
            f"the model returned a dict with keys {list(raw)}; pass output=KEY to choose the logits"
        )
    if isinstance(raw, tuple | list):
        if len(raw) == 1:
            return raw[0]
        raise OutputError(
            f"the model returned a {type(raw).__name__} of {len(raw)} items; pass output=INDEX "
            f"(or a callable) to choose the logits"
        )
    raise OutputError(
        f"the model returned {type(raw).__name__}, not a tensor; pass output= (a key, an index, "
        f"or a callable returning the logits)"
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf."""
    # A NaN or Inf makes the sum non-finite, so one reduction without a mask allocation settles
    # the common case; only an overflowing sum of finite values needs the element-wise check.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.ndim not in (4, 5):
        raise InputError(
            f"inputs must have shape (N, C, H, W) or (N, C, D, H, W); got {inputs.ndim}-D "
            f"{tuple(inputs.shape)} (add a batch axis with x[None] or a channel axis with "
            f"x[:, None])"
        )
    if not inputs.is_floating_point():
        raise InputError(f"inputs must be floating point; got {inputs.dtype}")
    if min(inputs.shape) == 0:
        raise InputError(f"inputs {tuple(inputs.shape)} have an empty axis")
    if not _all_finite(inputs):
        raise NonFiniteError("inputs hold NaN or Inf values; clean or mask them before explaining")


def _as_target_list(targets: TargetLike | Sequence[TargetLike]) -> list[TargetLike]:
    items = [targets] if isinstance(targets, TargetLike) else list(targets)
    if not items:
        raise TargetError("targets is empty: give at least one target, e.g. segcam.Predicted(1)")
    for item in items:
        if not isinstance(item, TargetLike):
            raise TargetError(
                f"{item!r} is not a target: it needs a class_index and a pixel_set(logits) method "
                f"(see segcam.targets)"
            )
    return items


def target_pixel_sets(targets: Sequence[TargetLike], logits: torch.Tensor) -> list[torch.Tensor]:
    """Each target's pixel set (N, *S) bool on ``logits``, its class index checked first."""
    result = []
    for target in targets:
        check_class_index(target.class_index, logits)
        result.append(as_pixel_set(target.pixel_set(logits), logits, repr(target)))
    return result


def _grad_output(logits: torch.Tensor, class_index: int, pixel_set: torch.Tensor) -> torch.Tensor:
    """D y^c_M / d logits: the pixel set in channel c (negated for class 0 of one channel)."""
    grad = torch.zeros_like(logits)
    weights = pixel_set.to(logits.dtype)
    if logits.shape[1] == 1:
        grad[:, 0] = weights if class_index == 1 else -weights
    else:
        grad[:, class_index] = weights
    return grad


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
    :math:`y^c_M = \sum_{p \in M} y^c_p` of sample n (raw logits), and the layer's activation
    channels :math:`A_k` give the raw map

    - ``"seg-hires-grad-cam"`` (Rheude et al., MELBA 2024):
      :math:`L = \sum_k \frac{\partial y^c_M}{\partial A_k} \odot A_k`
    - ``"seg-grad-cam"`` (Vinogradova et al., AAAI 2020):
      :math:`L = \sum_k \operatorname{mean}_p(\frac{\partial y^c_M}{\partial A_k}) A_k`

    (all registered methods: :func:`segcam.list_methods`). The computation is one forward pass
    for all targets and layers, then for a gradient method one backward pass per non-empty
    target from the logits to the hooked activations only (``torch.autograd.grad``: no
    parameter gradients, ``.grad`` untouched); the graph is freed at the end. Gradient-free
    methods take no backward pass (seg-score-cam runs further forwards on masked inputs).
    Samples never mix: each gets its own pixel set and map. The model's hooks, training flag
    and ``requires_grad`` flags are left as they were.

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
        output: how to find the logits in the model's output (see :func:`select_logits`).
        method_options: the method's options (e.g. ``{"pool_size": 4}`` for seg-xres-cam);
            ``segcam methods`` lists them.

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
        MethodNotFoundError: unknown method.
    """
    chosen = get_method(method)
    resolve_options(chosen, method_options)
    target_list = _as_target_list(targets)
    _check_normalize(normalize)
    recorded = record_forward(model, inputs, layer, output)
    try:
        return recorded.explain(
            target_list,
            chosen.name,
            relu=relu,
            upsample=upsample,
            normalize=normalize,
            keep_graph=False,
            method_options=method_options,
        )
    finally:
        recorded.release()


def _check_normalize(normalize: Any) -> None:
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be None, 'max' or 'minmax'; got {normalize!r}")


@dataclass
class RecordedForward:
    """One forward pass with its graph from the hooked layers to the logits kept alive.

    Made by :func:`record_forward`; :meth:`explain` takes one backward pass per target from it.
    :meth:`release` drops every reference to the graph, which frees it.
    """

    layer_names: list[str]
    input_size: tuple[int, ...]
    logits: torch.Tensor | None
    activations: list[torch.Tensor]
    layer_shapes: dict[str, tuple[int, ...]]
    detached_logits: torch.Tensor
    layouts: list[Layout]
    model: nn.Module | None = None
    inputs: torch.Tensor | None = None
    output: OutputSpec = None
    grid_activations: list[torch.Tensor] | None = None

    def release(self) -> None:
        """Drop the graph (logits and activations that hold it); explaining afterwards fails."""
        self.logits = None
        self.activations = []
        self.grid_activations = None
        self.model = None
        self.inputs = None

    def _grid_activations(self) -> list[torch.Tensor]:
        """The detached activations as (N, C, *grid), made once per forward."""
        if self.grid_activations is None:
            self.grid_activations = [
                to_channels_first(activation.detach(), layout)
                for activation, layout in zip(self.activations, self.layouts, strict=True)
            ]
        return self.grid_activations

    def _scorer(self, targets: list[TargetLike], pixel_sets: list[torch.Tensor]) -> Any:
        """``score(n, batch) -> (B, T)``: target scores of sample n for modified inputs."""
        model, output = self.model, self.output
        detached = self.detached_logits
        weights = torch.stack(
            [
                _grad_output(detached, target.class_index, pixel_set)
                for target, pixel_set in zip(targets, pixel_sets, strict=True)
            ],
            dim=1,
        )  # (N, T, K, *S): y^c_M = <weights, logits>

        def score(n: int, batch: torch.Tensor) -> torch.Tensor:
            assert model is not None
            with torch.inference_mode(False), torch.no_grad():
                logits = select_logits(model(batch), output, batch.ndim)
            return torch.einsum("bk...,tk...->bt", logits, weights[n].to(logits.dtype))

        return score

    def explain(
        self,
        targets: list[TargetLike],
        method: str,
        *,
        relu: bool,
        upsample: bool,
        normalize: Normalization | None,
        keep_graph: bool,
        method_options: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """Maps of ``targets``: one ``autograd.grad`` per non-empty target (gradient methods).

        With ``keep_graph`` the graph survives the last target, for later calls.
        """
        return self.explain_methods(
            targets,
            [method],
            relu=relu,
            upsample=upsample,
            normalize=normalize,
            keep_graph=keep_graph,
            method_options={method: method_options} if method_options else None,
        )[method]

    def explain_methods(
        self,
        targets: list[TargetLike],
        methods: Sequence[str],
        *,
        relu: bool,
        upsample: bool,
        normalize: Normalization | None,
        keep_graph: bool,
        method_options: Mapping[str, Mapping[str, Any] | None] | None = None,
    ) -> dict[str, Explanation]:
        """Maps of ``targets`` for several methods; gradient methods share each target's gradient.

        ``method_options`` maps a method name to its options. One ``autograd.grad`` per non-empty
        target serves every gradient method; gradient-free methods take none.
        """
        if self.logits is None:
            raise RuntimeError("this forward pass was released; run a new forward first")
        chosen = [get_method(method) for method in dict.fromkeys(methods)]
        given = method_options or {}
        options = {
            method.name: resolve_options(method, given.get(method.name)) for method in chosen
        }
        detached = self.detached_logits
        pixel_sets = target_pixel_sets(targets, detached)
        stacked_sets = torch.stack(pixel_sets, dim=1)
        nonempty = stacked_sets.flatten(2).any(dim=2)  # (N, T)
        _warn_empty(nonempty, targets)
        active = [t for t in range(len(targets)) if bool(nonempty[:, t].any())]

        grid_activations = self._grid_activations()
        gradient_methods = [method for method in chosen if method.needs_gradient]
        raw: dict[str, list[torch.Tensor]] = {}
        if gradient_methods:
            raw.update(
                self._gradient_maps(
                    gradient_methods, options, targets, pixel_sets, active, keep_graph
                )
            )
        for method in chosen:
            if not method.needs_gradient:
                raw[method.name] = self._gradient_free_maps(
                    method,
                    options[method.name],
                    targets,
                    pixel_sets,
                    stacked_sets,
                    nonempty,
                    grid_activations,
                )
        if not keep_graph:
            self.release()

        result = {}
        for method in chosen:
            layer_maps = {}
            for name, maps in zip(self.layer_names, raw[method.name], strict=True):
                maps = postprocess(
                    maps,
                    relu_maps=relu,
                    size=self.input_size if upsample else None,
                    normalization=normalize,
                )
                layer_maps[name] = maps
            result[method.name] = Explanation(
                layer_maps=layer_maps,
                logits=detached,
                pixel_sets=stacked_sets,
                targets=tuple(targets),
                method=method.name,
                relu=relu,
                upsampled=upsample,
                normalize=normalize,
                layer_shapes=self.layer_shapes,
                method_options=options[method.name],
            )
        return result

    def _gradient_maps(
        self,
        methods: list[Method],
        options: dict[str, dict[str, Any]],
        targets: list[TargetLike],
        pixel_sets: list[torch.Tensor],
        active: list[int],
        keep_graph: bool,
    ) -> dict[str, list[torch.Tensor]]:
        """Per method, (N, T, *grid) per layer, from one ``autograd.grad`` per active target.

        The gradient (to the layers only) is shared by all methods.
        """
        assert self.logits is not None
        grid_activations = self._grid_activations()
        per_method: dict[str, list[list[torch.Tensor]]] = {
            method.name: [
                [activation.new_zeros((activation.shape[0], *activation.shape[2:]))] * len(targets)
                for activation in grid_activations
            ]
            for method in methods
        }
        for position, t in enumerate(active):
            gradients = torch.autograd.grad(
                self.logits,
                self.activations,
                grad_outputs=_grad_output(
                    self.detached_logits, targets[t].class_index, pixel_sets[t]
                ),
                retain_graph=keep_graph or position < len(active) - 1,
            )
            for index, (activation, gradient, layout) in enumerate(
                zip(grid_activations, gradients, self.layouts, strict=True)
            ):
                laid = to_channels_first(gradient, layout)
                for method in methods:
                    per_method[method.name][index][t] = method.compute(
                        activation, laid, **options[method.name]
                    )
        return {
            name: [torch.stack(maps, dim=1) for maps in per_layer]
            for name, per_layer in per_method.items()
        }

    def _gradient_free_maps(
        self,
        chosen: Method,
        options: dict[str, Any],
        targets: list[TargetLike],
        pixel_sets: list[torch.Tensor],
        stacked_sets: torch.Tensor,
        nonempty: torch.Tensor,
        grid_activations: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """(N, T, *grid) per layer from a gradient-free method, all targets at once."""
        assert self.inputs is not None
        context = MethodContext(
            pixel_sets=stacked_sets,
            nonempty=nonempty,
            inputs=self.inputs,
            score=self._scorer(targets, pixel_sets) if chosen.kind == "model" else None,
        )
        return [chosen.compute(activation, context, **options) for activation in grid_activations]


def record_forward(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: LayerSpec | Sequence[LayerSpec],
    output: OutputSpec = None,
) -> RecordedForward:
    """Run the model once with the layers hooked; keep the graph from them to the logits.

    Checks the input and the logits, warns about training-mode BatchNorm/Dropout, and raises
    when a layer did not run or the output does not depend on it. Hooks are removed on exit.
    """
    _check_inputs(inputs)
    layers = resolve_layers(model, layer)
    training = _training_dependent(model)
    if training:
        warnings.warn(
            f"modules that behave differently in training are in training mode ({training}): "
            f"BatchNorm mixes the samples of a batch, Dropout makes the maps random; call "
            f"model.eval() first",
            SegCamWarning,
            stacklevel=3,
        )
    recorder = LayerRecorder(layers)
    with recorder.record():
        raw_output = model(inputs)
    logits = select_logits(raw_output, output, inputs.ndim)
    del raw_output
    if logits.shape[0] != inputs.shape[0]:
        raise OutputError(
            f"the logits' batch size {logits.shape[0]} differs from the input's {inputs.shape[0]}"
        )
    detached = logits.detach()
    if not _all_finite(detached):
        raise NonFiniteError("the model's logits hold NaN or Inf values for this input")
    activations = recorder.activations(logits)
    input_size = tuple(int(s) for s in inputs.shape[2:])
    specs = [spec if isinstance(spec, TokenLayer) else None for spec in layer_list(layer)]
    layouts = [
        infer_layout(name, tuple(activation.shape), input_size, spec)
        for (name, _), activation, spec in zip(layers, activations, specs, strict=True)
    ]
    return RecordedForward(
        layer_names=[name for name, _ in layers],
        input_size=input_size,
        logits=logits,
        activations=activations,
        layer_shapes={
            name: (int(a.shape[0]), _channels(a, layout), *layout.grid)
            for (name, _), a, layout in zip(layers, activations, layouts, strict=True)
        },
        detached_logits=detached,
        layouts=layouts,
        model=model,
        inputs=inputs,
        output=output,
    )


def _channels(activation: torch.Tensor, layout: Layout) -> int:
    return int(activation.shape[1] if layout.kind == "channels_first" else activation.shape[-1])


_TRAINING_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _training_dependent(model: nn.Module) -> str:
    """Names (at most three) of modules in training mode whose output depends on it."""
    names = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if module.training and isinstance(module, _TRAINING_DEPENDENT)
    ]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _warn_empty(nonempty: torch.Tensor, targets: list[TargetLike]) -> None:
    empty = ~nonempty  # (N, T)
    parts = []
    for t, target in enumerate(targets):
        samples = empty[:, t].nonzero().flatten().tolist()
        if samples:
            which = "all samples" if len(samples) == empty.shape[0] else f"samples {samples}"
            parts.append(f"target {t} {target!r} in {which}")
    if parts:
        warnings.warn(
            f"empty pixel set for {'; '.join(parts)}: the score is 0 and the map is all zero",
            SegCamWarning,
            stacklevel=4,  # the user's call of explain() or Explainer.explain()
        )
