"""segcam.monai.explain: a bundle explained through its own pipeline, on the original image.

The proofs: ``Predicted`` is the file ``monai.bundle.run`` writes, voxel for voxel; the maps are
float64 autograd of the masked sum of the inverted logits through MONAI's own inferer and
inverse; the score is that masked sum; transforms without a linear inverse are refused by name.
"""

from __future__ import annotations

import shutil
from copy import deepcopy

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

import nibabel as nib

import segcam
from segcam.errors import TargetError
from segcam.monai import BundleError, explain_and_predict, load_bundle, predict, read_case
from segcam.sliding import window_slices
from segcam.testing.bundles import NETWORK, PREPROCESSING, write_bundle
from segcam.testing.bundles import write_oblique_ct as oblique_ct

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # MONAI's own deprecation notes
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # MONAI's notes on metadata keys
]
LAYER = "model.1.submodule"
GRADIENT_METHODS = ("seg-hires-grad-cam", "seg-grad-cam")


def _inverse(bundle, case, values):
    """MONAI's own inverse of the image's transforms on ``values`` (what Invertd runs)."""
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.utils import allow_missing_keys_mode

    image = case.image
    tracked = MetaTensor(
        values, meta=deepcopy(image.meta), applied_operations=deepcopy(image.applied_operations)
    )
    with allow_missing_keys_mode(bundle.preprocessing):
        return bundle.preprocessing.inverse({"image": tracked})["image"].as_tensor()


def reference_maps(bundle, case, class_index, mask, method):
    """Float64 autograd through MONAI's inferer and inverse; window maps placed as segcam does."""
    network = bundle.network
    store = []

    def hook(_module, _inputs, output):
        output.retain_grad()
        store.append(output)

    x = case.image.as_tensor()[None].double()
    handle = network.get_submodule(LAYER).register_forward_hook(hook)
    try:
        logits = bundle.inferer(x, network)
    finally:
        handle.remove()
    exported = _inverse(bundle, case, logits[0])
    score = (exported[class_index].double() * mask).sum()
    score.backward()
    window = bundle.sliding_window()
    roi, overlap = window["roi_size"], window["overlap"]
    shape = tuple(case.shape)
    padded = tuple(max(r, s) for r, s in zip(roi, shape, strict=True))
    before = [(p - s) // 2 for p, s in zip(padded, shape, strict=True)]
    windows = window_slices(padded, roi, overlap)
    activations = [a for batch in store for a in batch]  # windows in MONAI's order
    grads = [g for batch in store for g in (batch.grad if batch.grad is not None else 0 * batch)]
    total = torch.zeros(padded, dtype=torch.float64)
    for where, activation, gradient in zip(windows, activations, grads, strict=True):
        if method == "seg-hires-grad-cam":
            window_map = (gradient * activation.detach()).sum(0)
        else:
            alpha = gradient.flatten(1).mean(1)
            window_map = (alpha[:, None, None, None] * activation.detach()).sum(0)
        up = torch.nn.functional.interpolate(window_map[None, None], size=roi, mode="trilinear")
        total[where] += up[0, 0]
    inner = total[tuple(slice(b, b + s) for b, s in zip(before, shape, strict=True))]
    return _inverse(bundle, case, inner[None].float().double())[0].double(), logits.detach()


@pytest.fixture
def ct(tmp_path):
    return oblique_ct(tmp_path / "ct.nii.gz")


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_predicted_is_the_segmentation_monai_bundle_run_writes(tmp_path, ct, mode):
    pytest.importorskip("ignite")  # MONAI's engines (the bundle's SupervisedEvaluator)
    import monai.bundle

    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 3,
               "overlap": 0.5, "mode": mode}  # fmt: skip
    folder = write_bundle(tmp_path / "bundle", inferer=inferer, seed=4)
    (folder / "images").mkdir()
    shutil.copy(ct, folder / "images" / "case.nii.gz")
    monai.bundle.run(config_file=str(folder / "configs" / "inference.json"))
    written = nib.load(folder / "eval" / "case_seg.nii.gz")
    bundle = load_bundle(folder)
    calls = []
    handle = bundle.network.register_forward_hook(lambda *_: calls.append(1))
    try:
        explanations, prediction = explain_and_predict(
            bundle, folder / "images" / "case.nii.gz", segcam.Predicted(1), LAYER,
            GRADIENT_METHODS, keep_bytes=2**31,
        )  # fmt: skip
    finally:
        handle.remove()
    windows = explanations["seg-grad-cam"].info["monai_bundle"]["windows"]
    # one pass: the prediction's forwards kept for the backward passes (3 windows a batch)
    assert len(calls) == -(-windows["windows"] // 3) and windows["windows"] > 3
    labels = np.asarray(written.dataobj)
    assert labels.shape == (40, 36, 20)  # the original CT's grid, not the 1.5x1.5x2 mm one
    assert 0 < (labels == 1).sum() < labels.size  # both classes present: a real test
    assert np.array_equal(prediction.labels.numpy(), labels)
    explanation = explanations["seg-hires-grad-cam"]
    assert np.array_equal(explanation.pixel_sets[0, 0].numpy(), labels == 1)
    assert explanation.maps.shape == (1, 1, 40, 36, 20)
    np.testing.assert_allclose(
        read_case(bundle, ct).original_affine, written.affine, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    ("mode", "shape", "roi"),
    [
        ("constant", (40, 36, 20), (32, 32, 16)),  # preprocessed 22x22x25: padded as MONAI pads
        ("gaussian", (40, 36, 20), (12, 12, 12)),  # 3x3x5 windows, starts off the stride
    ],
)
def test_maps_are_float64_autograd_of_the_inverted_logits_through_the_pipeline(
    tmp_path, mode, shape, roi
):
    ct = oblique_ct(tmp_path / "ct.nii.gz", shape, seed=1)
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 2,
               "overlap": 0.5, "mode": mode, "sigma_scale": 0.2}  # fmt: skip
    bundle = load_bundle(write_bundle(tmp_path / "bundle", inferer=inferer, seed=2))
    bundle.network.double()
    case = read_case(bundle, ct)
    box = torch.zeros(case.original_shape, dtype=torch.bool)
    box[8:30, 5:25, 4:15] = True
    targets = [segcam.Mask(1, box), segcam.Predicted(0)]
    explanations, prediction = explain_and_predict(
        bundle, case, targets, LAYER, GRADIENT_METHODS, relu=False
    )
    predicted = prediction.predicted(0)
    assert 0 < int(predicted.sum()) < predicted.numel()
    for method in GRADIENT_METHODS:
        ours = explanations[method]
        for t, (c, mask) in enumerate([(1, box), (0, predicted)]):
            expected, logits = reference_maps(bundle, case, c, mask.double(), method)
            actual = ours.maps[0, t]
            assert actual.shape == expected.shape == case.original_shape
            scale = float(expected.abs().max())
            assert scale > 0
            assert float((actual - expected).abs().max()) <= 1e-6 * scale, (method, t)
    # the logits are the network's brought back by the bundle's inverse: the score's own
    exported = _inverse(bundle, case, logits[0]).double()
    torch.testing.assert_close(ours.logits[0].double(), exported, rtol=0, atol=1e-6)
    info = ours.info["monai_bundle"]
    assert info["windows"]["placement"] == {LAYER: "input"}  # as the reference places them
    assert info["inverse"] == ["Orientation", "SpatialResample"]
    assert info["sliding_window"]["mode"] == mode


def test_the_score_is_the_masked_sum_of_the_inverted_logits(tmp_path, ct):
    """W = E^T M: <W, y^c> on the preprocessed grid equals <M, E(y^c)> on the original one."""
    from segcam.monai.pipeline import export_of

    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    case = read_case(bundle, ct)
    export = export_of(bundle, case)
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand((2, *case.original_shape), generator=generator) > 0.5
    values = torch.randn((2, *case.shape), generator=generator, dtype=torch.float64)
    weights = export.adjoint(mask.double(), case, torch.float64)
    assert weights.shape == (2, *case.shape) and weights.dtype == torch.float64
    inner = (weights * values).sum((1, 2, 3))
    outer = (mask * export(values, case).double()).sum((1, 2, 3))
    torch.testing.assert_close(inner, outer, rtol=1e-6, atol=0)
    assert float(weights.abs().sum()) > 0


def test_without_invertd_the_maps_lie_on_the_preprocessed_grid(tmp_path, ct):
    """No Invertd: E is the identity, and the bundle is explain_sliding_window on its input."""
    bundle = load_bundle(write_bundle(tmp_path / "bundle", invert=False, save=False))
    bundle.network.double()
    case = read_case(bundle, ct)
    box = segcam.Box(1, [(2, 18), (3, 20), (4, 20)])
    ours = segcam.monai.explain(bundle, case, box, LAYER, relu=False)
    x = torch.nn.functional.pad(case.image.as_tensor()[None].double(), (0, 0, 5, 5, 5, 5))
    padded_box = segcam.Box(1, [(7, 23), (8, 25), (4, 20)])
    direct = segcam.explain_sliding_window(
        bundle.network, x, padded_box, LAYER, (32, 32, 16), overlap=0.5, mode="constant",
        sw_batch_size=4, relu=False,
    )  # fmt: skip
    assert ours.maps.shape == (1, 1, *case.shape)
    torch.testing.assert_close(ours.maps, direct.maps[..., 5:27, 5:27, :], rtol=1e-10, atol=1e-12)


def test_a_transform_without_a_linear_inverse_is_refused_by_name(tmp_path, ct):
    lam = {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x * 2",
           "inv_func": "$lambda x: x.exp()"}  # fmt: skip
    bundle = load_bundle(write_bundle(tmp_path / "bundle", preprocessing=[*PREPROCESSING, lam]))
    with pytest.raises(BundleError, match=r"applies Lambda, whose inverse.*not know to be linear"):
        explain_and_predict(bundle, ct, segcam.Predicted(1), LAYER, ["seg-hires-grad-cam"])


def test_targets_that_read_probabilities_are_refused(tmp_path, ct):
    bundle = load_bundle(write_bundle(tmp_path / "bundle"))
    with pytest.raises(TargetError, match="probability threshold is not defined"):
        segcam.monai.explain(bundle, ct, segcam.Probability(1, 0.4), LAYER)
    with pytest.raises(segcam.errors.ClassIndexError, match="2 output channel"):
        segcam.monai.explain(bundle, ct, segcam.Box(2, [(0, 4)] * 3), LAYER)
    with pytest.raises(BundleError, match="preprocessing fails"):
        predict(bundle, read_case(bundle, tmp_path / "missing.nii.gz"))


def test_the_bundles_page_python_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "bundles.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)[0]
    write_bundle(tmp_path / "spleen_ct_segmentation")
    oblique_ct(tmp_path / "ct.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/bundles.md", "exec"), namespace)
    assert tuple(namespace["explanations"]["seg-hires-grad-cam"].maps.shape) == (1, 1, 40, 36, 20)
    assert tuple(namespace["prediction"].labels.shape) == (40, 36, 20)


def _run_bundle(folder, ct):
    """``monai.bundle.run`` on the bundle's images folder; the file it writes, as an array."""
    pytest.importorskip("ignite")
    import monai.bundle

    (folder / "images").mkdir()
    shutil.copy(ct, folder / "images" / "case.nii.gz")
    monai.bundle.run(config_file=str(folder / "configs" / "inference.json"))
    return np.asarray(nib.load(folder / "eval" / "case_seg.nii.gz").dataobj)


def test_a_single_logit_sigmoid_bundle_explains_its_foreground(tmp_path, ct):
    network = {**NETWORK, "out_channels": 1}
    folder = write_bundle(tmp_path / "b", network=network, classes=("spleen",),
                          activation="sigmoid", seed=3)  # fmt: skip
    written = _run_bundle(folder, ct)
    bundle = load_bundle(folder)
    assert bundle.class_names == ("background", "spleen")  # class 1 is the logit
    explanation, prediction = explain_and_predict(
        bundle, ct, segcam.Predicted(1), LAYER, ["seg-hires-grad-cam"]
    )
    assert 0 < (written == 1).sum() < written.size
    assert np.array_equal(explanation["seg-hires-grad-cam"].pixel_sets[0, 0].numpy(), written == 1)
    assert np.array_equal(prediction.predicted(0).numpy(), written == 0)
    assert np.array_equal(prediction.labels.numpy(), written.astype(np.int64))


def test_a_multi_label_bundle_has_its_sets_but_no_label_map(tmp_path, ct):
    network = {**NETWORK, "out_channels": 3}
    folder = write_bundle(tmp_path / "b", network=network, classes=("tc", "wt", "et"),
                          activation="sigmoid", seed=5)  # fmt: skip
    written = np.moveaxis(_run_bundle(folder, ct), -1, 0)  # SaveImaged: channels last
    bundle = load_bundle(folder)
    prediction = predict(bundle, read_case(bundle, ct))
    assert prediction.multi_label
    for c in range(3):
        assert np.array_equal(prediction.predicted(c).numpy(), written[c] > 0.5)
    with pytest.raises(BundleError, match="multi-label"):
        _ = prediction.labels


def test_scalar_rois_and_per_axis_sigmas_blend_as_monai_does(tmp_path, ct):
    from segcam.monai.pipeline import export_of, run_inferer

    for inferer in (
        {"_target_": "SlidingWindowInferer", "roi_size": 16, "sw_batch_size": 2},
        {"_target_": "SlidingWindowInferer", "roi_size": [16, 12, 16], "mode": "gaussian",
         "sigma_scale": [0.1, 0.2, 0.3], "overlap": [0.25, 0.5, 0.6]},
    ):  # fmt: skip
        folder = write_bundle(tmp_path / f"b{len(list(tmp_path.iterdir()))}", inferer=inferer)
        bundle = load_bundle(folder)
        case = read_case(bundle, ct)
        explanation = segcam.monai.explain(bundle, case, segcam.Predicted(1), LAYER)
        monai_logits = export_of(bundle, case)(run_inferer(bundle, case), case)
        assert torch.equal(explanation.logits[0], monai_logits)  # the same blend, bit for bit
        assert float(explanation.maps.max()) > 0


def test_pipelines_segcam_cannot_follow_are_one_clear_error(tmp_path, ct):
    import json

    folder = write_bundle(tmp_path / "keys")
    config = json.loads((folder / "configs" / "inference.json").read_text())
    for step in config["postprocessing"]["transforms"]:
        if step["_target_"] == "Invertd":
            step["orig_keys"] = "img"
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="orig_keys 'img', which the preprocessing does not"):
        segcam.monai.explain(load_bundle(folder), ct, segcam.Box(1, [(2, 9)] * 3), LAYER)
    # ToTensord's inverse converts to NumPy: no gradient through it, said as such
    tensor = {"_target_": "ToTensord", "keys": "image"}
    steps = [*PREPROCESSING[:2], tensor, *PREPROCESSING[2:]]
    bundle = load_bundle(write_bundle(tmp_path / "t", preprocessing=steps))
    with pytest.raises(BundleError, match="applies ToTensord: its inverse converts the values"):
        segcam.monai.explain(bundle, ct, segcam.Predicted(1), LAYER)
    broken = write_bundle(tmp_path / "fit", state={"model.0.conv.unit0.conv.weight":
                                                   torch.zeros(1)})  # fmt: skip
    with pytest.raises(BundleError, match=r"does not fit network_def \((Missing key|Unexpected)"):
        load_bundle(broken)
