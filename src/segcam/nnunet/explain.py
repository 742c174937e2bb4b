r"""Exact whole-case explanations of nnU-Net v2 predictions, in the original image's geometry.

nnU-Net predicts a case window by window: for fold $f$, window $w$ and mirroring $a \in A$
(no flip, and every non-empty subset of the allowed mirror axes) the network's logits
$y_{f,w,a} = \mathrm{flip}_a N_f(\mathrm{flip}_a \tilde X_w)$ are averaged over $A$, blended with
a Gaussian $g$, averaged over the folds and exported (resampled to the cropped original shape,
put into the crop box, axes transposed back):

$$
\ell = E\Big(\frac1F \sum_f \frac{\sum_w g\, \frac{1}{|A|}\sum_a y_{f,w,a}}{\sum_w g}\Big).
$$

The target score is the masked sum of the **exported** logits, $T = \sum_v M(v)\,\ell^c(v)$.
Everything after the network is linear, so with $W = E^\top M$ (one adjoint resampling,
:mod:`segcam.nnunet.geometry`) the gradient output of forward $(f, w, a)$ in channel $c$ is

$$
\Omega_{f,w,a} = \frac{1}{F\,|A|}\, \mathrm{flip}_a\Big(\frac{\tilde W_w\, g}{\sum_{w'} g}\Big),
$$

and one partial backward from that forward's logits to the layer gives exactly
$\partial T / \partial A_{f,w,a}$. A window whose $\tilde W_w$ is zero is skipped.

Maps (one convention): each forward's map (the method applied to its activation and
gradient) is up-sampled to its window (half-pixel linear), flipped back, summed on the padded
preprocessed grid, unpadded and brought to the original grid as nnU-Net brings its logits
(the same resampling, zeros outside the crop box, axes transposed back). ReLU and
normalisation follow on the original grid.

The blended logits are computed as nnU-Net computes them (float16 accumulation, its Gaussian,
windows, mirror order and fold average), and ``Predicted`` sets are nnU-Net's own export of
them: the voxels ``nnUNetv2_predict`` labels with the class (for region models, where the
region's sigmoid exceeds 0.5).

:class:`CaseExplainer` is the interactive form (as :class:`segcam.Explainer` is for one
forward): it predicts the case once and keeps, per (fold, window, mirroring group), the
recorded forward of the layers last asked for, so new targets on those layers cost only the
partial backward passes of the windows they meet. The maps are the same as
:func:`explain_methods`' for the same targets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from segcam.errors import OptionError
from segcam.explanation import Explanation
from segcam.layers import LayerSpec
from segcam.memory_format import MemoryFormat, check_memory_format
from segcam.methods import Method, MethodOptions, resolve_methods
from segcam.nnunet.case import CaseLike, read_case
from segcam.nnunet.case_explanation import (
    KEEP_BYTES,
    CaseExplanation,
    KeepBudget,
    KeptWindows,
    case_facts,
)
from segcam.nnunet.model import NnUNetModel
from segcam.nnunet.predict import NnUNetPrediction, export, predict_logits
from segcam.nnunet.targets import predicted_sets, resolve_targets
from segcam.nnunet.windows import (
    plan_case,
)
from segcam.postprocess import Normalization, PostProcessing
from segcam.targets import TargetLike, uses_logits

__all__ = ["KEPT_LAYERS", "CaseExplainer", "explain", "explain_and_predict", "explain_methods"]

KEPT_LAYERS = 2  # layer choices whose forwards a CaseExplainer keeps (the viewer's two panels)


def explain_and_predict(
    model: NnUNetModel,
    case: CaseLike,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    step_size: float = 0.5,
    mirroring: bool = True,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    method_options: MethodOptions | None = None,
    per_fold: bool = False,
    progress: Callable[[int, int], None] | None = None,
    memory_format: MemoryFormat = "auto",
) -> tuple[dict[str, Explanation], NnUNetPrediction]:
    """:func:`explain_methods` and nnU-Net's prediction of the case (for its segmentation)."""
    layout = check_memory_format(memory_format)
    chosen = resolve_methods(methods, method_options)
    _refuse_gradient_free(chosen)
    post = PostProcessing(relu, upsample, normalize)
    read = read_case(model, case)
    plan = plan_case(model, read, step_size, mirroring)
    target_list = resolve_targets(model, targets)
    # Sets fixed beforehand: one pass predicts and explains. Else nnU-Net's prediction first.
    sets_fixed = not any(uses_logits(t) for t in target_list)
    prediction = (
        None if sets_fixed else export(model, read, predict_logits(model, read, plan, layout))
    )
    target_list = predicted_sets(model, target_list, prediction)
    explanation = CaseExplanation(
        model, read, plan, target_list, chosen, layer, per_fold, layout=layout
    )
    if prediction is not None:  # the prediction pass ran every forward once without gradients
        explanation.forwards = len(model.networks) * len(plan.windows) * len(plan.mirrors)
    blended = explanation.run(blend=sets_fixed, progress=progress)
    if prediction is None:
        assert blended is not None
        prediction = export(model, read, blended)
    facts = case_facts(model, plan, read, explanation, mirroring, step_size, upsample)
    return explanation.assemble(prediction, post, facts), prediction


class CaseExplainer:
    """One nnU-Net case explained again and again: forwards kept per window for a layer choice.

    The case is read and predicted once (:attr:`prediction`, nnU-Net's own export). Each
    :meth:`explain_methods` call resolves its targets on that prediction and runs the windows
    its pixel sets meet; their recorded forwards (the layers' activations and the graph from
    them to the logits) are kept for the :data:`KEPT_LAYERS` most recently asked layer choices
    (two panels on two layers stay interactive), within ``keep_bytes`` for all of them (beyond
    it, forwards are run and freed as :func:`explain_methods` does; a new layer choice frees
    the least recent one's first when the budget is spent). :meth:`close` frees everything.

    Args:
        model: from :func:`segcam.nnunet.load`.
        case: as for :func:`explain`.
        step_size, mirroring: nnU-Net's inference settings.
        keep_bytes: the budget of kept forwards (estimated from the tensors they hold).
        memory_format: the convolutions' memory layout (:mod:`segcam.memory_format`).
    """

    def __init__(
        self,
        model: NnUNetModel,
        case: CaseLike,
        *,
        step_size: float = 0.5,
        mirroring: bool = True,
        keep_bytes: int = KEEP_BYTES,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        self.model = model
        self.layout = check_memory_format(memory_format)
        self.case = read_case(model, case)
        self.step_size, self.mirroring = float(step_size), bool(mirroring)
        self.plan = plan_case(model, self.case, step_size, mirroring)
        self.prediction = export(
            model, self.case, predict_logits(model, self.case, self.plan, self.layout)
        )
        self._budget = KeepBudget(int(keep_bytes))
        self._kept: OrderedDict[str, KeptWindows] = OrderedDict()

    @property
    def kept_bytes(self) -> int:
        """The estimated bytes of the kept forwards (every kept layer choice)."""
        return self._budget.used

    def _store(self, layer: LayerSpec | Sequence[LayerSpec]) -> KeptWindows:
        """The layer choice's store of kept forwards, most recent last."""
        key = repr(layer)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        while self._kept and (
            len(self._kept) >= KEPT_LAYERS or self._budget.used >= self._budget.limit
        ):
            _, oldest = self._kept.popitem(last=False)
            oldest.close()
        self._kept[key] = KeptWindows(self._budget)
        return self._kept[key]

    def explain_methods(
        self,
        targets: TargetLike | Sequence[TargetLike],
        layer: LayerSpec | Sequence[LayerSpec],
        methods: Sequence[str],
        *,
        relu: bool = True,
        upsample: bool = True,
        normalize: Normalization | None = None,
        method_options: MethodOptions | None = None,
        per_fold: bool = False,
    ) -> dict[str, Explanation]:
        """The maps of :func:`explain_methods` for these targets, from the kept forwards."""
        chosen = resolve_methods(methods, method_options)
        _refuse_gradient_free(chosen)
        store = self._store(layer)
        target_list = predicted_sets(
            self.model, resolve_targets(self.model, targets), self.prediction
        )
        explanation = CaseExplanation(
            self.model,
            self.case,
            self.plan,
            target_list,
            chosen,
            layer,
            per_fold,
            store,
            layout=self.layout,
        )
        explanation.run(blend=False)
        facts = case_facts(
            self.model, self.plan, self.case, explanation, self.mirroring, self.step_size, upsample
        )
        return explanation.assemble(
            self.prediction, PostProcessing(relu, upsample, normalize), facts
        )

    def close(self) -> None:
        """Free every kept forward."""
        for store in self._kept.values():
            store.close()
        self._kept.clear()


def _refuse_gradient_free(chosen: Sequence[tuple[Method, Any]]) -> None:
    free = [m.name for m, _ in chosen if not m.needs_gradient]
    if free:
        raise OptionError(
            f"{', '.join(free)}: gradient-free methods are not available for nnU-Net models; "
            f"use a gradient method (seg-hires-grad-cam, seg-grad-cam, ...)"
        )


def explain_methods(
    model: NnUNetModel,
    case: CaseLike,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    methods: Sequence[str],
    *,
    step_size: float = 0.5,
    mirroring: bool = True,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    method_options: MethodOptions | None = None,
    per_fold: bool = False,
    progress: Callable[[int, int], None] | None = None,
    memory_format: MemoryFormat = "auto",
) -> dict[str, Explanation]:
    """Several gradient methods from the same forward and backward passes (see :func:`explain`)."""
    return explain_and_predict(
        model,
        case,
        targets,
        layer,
        methods,
        step_size=step_size,
        mirroring=mirroring,
        relu=relu,
        upsample=upsample,
        normalize=normalize,
        method_options=method_options,
        per_fold=per_fold,
        progress=progress,
        memory_format=memory_format,
    )[0]


def explain(
    model: NnUNetModel,
    case: CaseLike,
    targets: TargetLike | Sequence[TargetLike],
    layer: LayerSpec | Sequence[LayerSpec],
    method: str = "seg-hires-grad-cam",
    *,
    step_size: float = 0.5,
    mirroring: bool = True,
    relu: bool = True,
    upsample: bool = True,
    normalize: Normalization | None = None,
    method_options: Mapping[str, Any] | None = None,
    per_fold: bool = False,
    progress: Callable[[int, int], None] | None = None,
    memory_format: MemoryFormat = "auto",
) -> Explanation:
    r"""Explain nnU-Net's prediction of one case exactly, on the original image's grid.

    The score is the masked sum of nnU-Net's *exported* logits (after sliding windows,
    mirroring, Gaussian blending, fold averaging, resampling, uncropping and transposing):
    $y^c_M = \sum_{v \in M} \ell^c(v)$, with M on the original grid. See the module's
    docstring for the exact gradient and the map convention.

    Args:
        model: from :func:`segcam.nnunet.load`.
        case: the case's channel files, ``(array (C, *S), properties)`` as
            ``nnUNetPredictor.predict_single_npy_array`` takes them, or a read case.
        targets: targets in original voxel coordinates (the array order of nnU-Net's reader):
            ``Predicted("liver")`` = the voxels nnU-Net's export labels liver, ``Mask(c, array or
            label file)``, ``Box``, ``Pixel``, ``AllPixels``, ``Region``; classes by index or by
            their name in ``dataset.json`` (regions of region models by their name).
        layer: the layer(s) to explain (module names, e.g. ``decoder.stages.1``).
        method: a gradient method (default Seg-HiRes-Grad CAM).
        step_size: nnU-Net's tile step size (fraction of the patch).
        mirroring: mirroring test-time augmentation over the checkpoint's allowed axes.
        relu: keep the positive part (after the maps reach the original grid).
        normalize: ``"max"`` or ``"minmax"`` per map, last.
        upsample: True: maps on the original grid. False: maps on the preprocessed (network
            input) grid, before the export; ``info["nnunet"]["geometry"]`` says how it maps back.
        method_options: the method's options.
        per_fold: also give each fold's own maps (:attr:`Explanation.members`, ``fold_<f>``)
            and the folds' agreement (``info["nnunet"]["fold_agreement"]``).
        progress: called with (done, total) forwards.
        memory_format: the convolutions' memory layout in every forward
            (:mod:`segcam.memory_format`): ``"auto"`` runs channels-last 3D convolutions for
            a float32 network on the CPU, its logits nnU-Net's to float32 rounding;
            ``"contiguous"`` runs nnU-Net's own forwards, its logits nnU-Net's bit for bit.

    Raises:
        NnUNetError: the case cannot be read or used with the model.
        ClassIndexError: a class index or name the model does not have.
        OptionError: a bad option or a gradient-free method.
    """
    return explain_methods(
        model,
        case,
        targets,
        layer,
        [method],
        step_size=step_size,
        mirroring=mirroring,
        relu=relu,
        upsample=upsample,
        normalize=normalize,
        method_options={method: method_options} if method_options else None,
        per_fold=per_fold,
        progress=progress,
        memory_format=memory_format,
    )[method]
