"""segcam.nnunet.explain: exact whole-case explanations of nnU-Net predictions (issue 15).

Proofs: nnU-Net's own predictor gives the same blended logits (bit for bit) and segmentation; the
maps equal autograd of the masked sum of the *exported* logits through a float64 reference of
the whole pipeline, written here independently (patches, mirroring, Gaussian blend, folds,
``F.interpolate`` for the export resampling, uncrop, transpose); closed forms; skipped windows.
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import segcam

pytest.importorskip("nnunetv2")

from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import (
    compute_gaussian,
    compute_steps_for_sliding_window,
)
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from scipy.ndimage import map_coordinates

from segcam import nnunet
from segcam.nnunet.geometry import linear_matrix, nearest_matrix, separate_z
from segcam.testing.nnunet import make_model_folder

pytestmark = pytest.mark.filterwarnings("ignore:perform_everything_on_device")


def _image(shape, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((channels, *shape)) * 300 + 40).astype(np.float32)


def _predictor(folder, folds, step=0.5, mirroring=True):
    predictor = nnUNetPredictor(
        tile_step_size=step,
        use_mirroring=mirroring,
        device=torch.device("cpu"),
        perform_everything_on_device=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    return predictor


# ---------------------------------------------------------------- nnU-Net's own numbers


@pytest.mark.parametrize(
    ("configuration", "patch", "shape", "folds", "step", "mirroring"),
    [
        ("3d_fullres", (16, 16, 16), (20, 23, 26), (0,), 0.5, True),
        ("3d_fullres", (16, 16, 16), (20, 23, 26), (0, 1), 1.0, False),
        ("3d_fullres", (16, 16, 16), (9, 12, 20), (0, 1), 0.5, True),  # smaller than the patch
        ("2d", (16, 16), (3, 20, 27), (0,), 0.5, True),
        ("2d", (16, 16), (2, 18, 16), (0, 1), 1.0, False),
    ],
)
def test_blended_logits_and_segmentation_are_nnunets(
    tmp_path, configuration, patch, shape, folds, step, mirroring
):
    folder = make_model_folder(
        tmp_path / "m",
        folds=folds,
        configuration=configuration,
        patch_size=patch,
        mirroring_axes=tuple(range(len(patch))),
    )
    model = nnunet.load(folder, folds=folds)
    image, properties = _image(shape), {"spacing": [1.0, 1.0, 1.0]}
    predictor = _predictor(folder, folds, step, mirroring)
    case = nnunet.read_case(model, (image, properties))
    expected = predictor.predict_logits_from_preprocessed_data(case.data.clone())
    ours = nnunet.predict(model, case, step_size=step, mirroring=mirroring)
    assert ours.logits.dtype == torch.float16
    assert torch.equal(ours.logits, expected)  # bit for bit, float16 path included
    segmentation = predictor.predict_single_npy_array(image, dict(properties))
    assert np.array_equal(ours.segmentation, segmentation)
    # the explanation pass's own logits (static target) are the same numbers
    explanation = nnunet.explain(
        model, case, segcam.AllPixels(1), "decoder.stages.1", step_size=step, mirroring=mirroring
    )
    assert torch.equal(explanation.logits, ours.original_logits()[None])
    assert explanation.info["nnunet"]["windows_skipped"] == 0


def test_predicted_sets_are_the_written_segmentation(tmp_path):
    import SimpleITK as sitk  # noqa: N813

    folder = make_model_folder(tmp_path / "m", folds=(0, 1), head_bias=(0.0, 0.0, -1.0))
    model = nnunet.load(folder, folds="all")
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    image = sitk.GetImageFromArray(_image((18, 21, 25), seed=3)[0])
    image.SetSpacing((0.8, 1.1, 1.3))
    image.SetOrigin((5.0, -3.0, 2.0))
    sitk.WriteImage(image, str(raw / "case_0000.nii.gz"))
    _predictor(folder, (0, 1)).predict_from_files(
        str(raw), str(out), save_probabilities=False, num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )  # fmt: skip
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
    targets = [segcam.Predicted(name) for name in ("background", "liver", "tumour")]
    explanation = nnunet.explain(model, [raw / "case_0000.nii.gz"], targets, "decoder.stages.1")
    assert explanation.maps.shape == (1, 3, *written.shape)
    assert set(np.unique(written)) == {0, 1, 2}
    for index in range(3):
        assert torch.equal(explanation.pixel_sets[0, index], torch.from_numpy(written == index))
    assert explanation.targets[1].describe()["class_index"] == 1


# ---------------------------------------------------------------- the export, exactly


@pytest.mark.parametrize(
    ("source", "target", "current", "new"),
    [
        ((7, 9, 11), (13, 5, 11), [1, 1, 1], [1, 1, 1]),
        ((5, 12, 10), (11, 20, 17), [3.5, 0.5, 0.5], [1.0, 0.5, 0.5]),  # separate z, nearest
    ],
)
def test_export_matrices_are_nnunets_resampling(source, target, current, new):
    data = np.random.default_rng(1).standard_normal((2, *source))
    expected = resample_data_or_seg_to_shape(
        data, target, current, new, is_seg=False, order=1, order_z=0, force_separate_z=None
    )
    separate, axis = separate_z({"force_separate_z": None}, current, new)  # nnU-Net's rule
    matrices = [
        nearest_matrix(o, i) if separate and k == axis else linear_matrix(o, i)
        for k, (o, i) in enumerate(zip(target, source, strict=True))
    ]
    ours = np.einsum("cijk,ai,bj,dk->cabd", data, *matrices)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-13)


# ---------------------------------------------------------------- the float64 reference


def _reference_export(values, case, model):
    """The export written with torch ops: resample, uncrop, transpose (differentiable)."""
    geometry = case.geometry
    cropped = geometry.cropped
    if geometry.separate_z_axis is None:
        out = F.interpolate(values[None], size=cropped, mode="trilinear", align_corners=False)[0]
    else:
        axis = geometry.separate_z_axis
        moved = values.movedim(axis + 1, 1)  # (K, Z, a, b)
        plane = [s for k, s in enumerate(cropped) if k != axis]
        k, z = moved.shape[:2]
        flat = F.interpolate(moved.reshape(k * z, 1, *moved.shape[2:]), size=plane,
                             mode="bilinear", align_corners=False)  # fmt: skip
        moved = flat.reshape(k, z, *plane)
        n_in, n_out = z, cropped[axis]
        coordinates = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        source = map_coordinates(np.arange(n_in, dtype=float), coordinates[None], order=0,
                                 mode="nearest")  # fmt: skip
        moved = moved[:, torch.from_numpy(np.rint(source).astype(np.int64))]
        out = moved.movedim(1, axis + 1)
    full = out.new_zeros((out.shape[0], *geometry.before_cropping))
    full[(slice(None), *(slice(a, b) for a, b in geometry.bbox))] = out
    return full.permute(0, *(a + 1 for a in geometry.transpose_backward))


def _reference(model, case, targets, layer, method, step=0.5, mirroring=True):
    """Maps by autograd of the exported float64 logits' masked sums; (T, *original)."""
    patch = tuple(model.configuration_manager.patch_size)
    data = case.data.double()
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    spatial = padded.shape[1:]
    two_d = len(patch) < len(spatial)
    steps = compute_steps_for_sliding_window(spatial[1:] if two_d else spatial, patch, step)
    windows = [
        tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
        for starts in itertools.product(*steps)
    ]
    if two_d:
        windows = [(d, *w) for d in range(spatial[0]) for w in windows]
    g = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).clone().double()
    axes = model.mirroring_axes if mirroring else None
    mirrors = [()] + (
        [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)] if axes else []
    )
    records = []  # (window, mirror, activation)
    folds = []
    for network in model.networks:
        net = network.double()
        module = dict(net.named_modules())[layer]
        numerator = torch.zeros((model.label_manager.num_segmentation_heads, *spatial),
                                dtype=torch.float64)  # fmt: skip
        denominator = torch.zeros(spatial, dtype=torch.float64)
        for window in windows:
            outputs = []
            for mirror in mirrors:
                dims = [a + 2 for a in mirror]
                x = padded[(slice(None), *window)][None]
                x = torch.flip(x, dims) if mirror else x
                captured = []

                def keep(module, inputs, output, captured=captured):
                    captured.append(output.clone())
                    return captured[-1]  # the rest of the network uses this activation

                handle = module.register_forward_hook(keep)
                y = net(x)
                handle.remove()
                records.append((window, mirror, captured[-1]))
                outputs.append(torch.flip(y, dims) if mirror else y)
            mean = torch.stack(outputs).mean(0)[0]
            numerator[(slice(None), *window)] = numerator[(slice(None), *window)] + g * mean
            denominator[window] = denominator[window] + g
        folds.append((numerator / denominator)[(slice(None), *revert[1:])])
    logits = torch.stack(folds).mean(0)
    exported = _reference_export(logits, case, model)
    maps = []
    for class_index, mask in targets:
        score = (exported[class_index] * torch.as_tensor(mask, dtype=torch.float64)).sum()
        gradients = torch.autograd.grad(score, [a for _, _, a in records], retain_graph=True)
        total = torch.zeros(spatial, dtype=torch.float64)
        for (window, mirror, activation), gradient in zip(records, gradients, strict=True):
            if method == "seg-hires-grad-cam":
                layer_map = (gradient * activation).sum(1)
            else:
                weights = gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
                layer_map = (weights * activation).sum(1)
            mode = "trilinear" if len(patch) == 3 else "bilinear"
            up = F.interpolate(layer_map[:, None], size=patch, mode=mode, align_corners=False)
            up = up[0, 0]
            total[window] += torch.flip(up, list(mirror)) if mirror else up
        unpadded = total[revert[1:]]
        maps.append(_reference_export(unpadded[None].detach(), case, model)[0])
    for network in model.networks:
        network.float()
    return torch.stack(maps), exported.detach()


def _boxes(shape):
    mask = np.zeros(shape, dtype=bool)
    mask[2:7, 3:11, 4:9] = True
    other = np.zeros(shape, dtype=bool)
    other[-5:, :4, -6:] = True
    return mask, other


@pytest.mark.parametrize(
    ("options", "shape", "spacing", "method"),
    [
        ({}, (18, 21, 20), [1.0, 1.0, 1.0], "seg-hires-grad-cam"),
        ({"folds": (0, 1)}, (18, 21, 20), [1.0, 1.2, 0.9], "seg-grad-cam"),
        ({"regions": True}, (18, 21, 20), [1.0, 1.0, 1.0], "seg-hires-grad-cam"),
        # anisotropic: the export resamples z by nearest neighbour (separate z)
        ({"spacing": (4.0, 1.0, 1.0)}, (9, 20, 19), [2.5, 1.0, 1.0], "seg-hires-grad-cam"),
        (
            {"transpose_forward": (2, 0, 1), "channels": ("CT", "T2")},
            (16, 19, 21),
            [1.0, 1.0, 1.0],
            "seg-grad-cam",
        ),
        (
            {"configuration": "2d", "patch_size": (16, 16), "mirroring_axes": (0, 1)},
            (3, 19, 22),
            [3.0, 1.0, 1.0],
            "seg-hires-grad-cam",
        ),
    ],
)
def test_maps_are_the_gradient_of_the_exported_logits(tmp_path, options, shape, spacing, method):
    folds = options.pop("folds", (0,))
    folder = make_model_folder(tmp_path / "m", folds=folds, **options)
    model = nnunet.load(folder, folds=folds)
    for network in model.networks:
        network.double()
    channels = len(model.dataset_json["channel_names"])
    image = _image(shape, seed=5, channels=channels)
    image[:, :, :2] = 0  # a zero border: nnU-Net crops to the nonzero box
    case = nnunet.read_case(model, (image, {"spacing": spacing}))
    assert case.geometry.cropped != case.geometry.before_cropping  # cropped to nonzero
    original = case.original_shape
    mask, other = _boxes(original)
    layer = "decoder.stages.0"
    explanation = nnunet.explain(
        model, case, [segcam.Mask(1, mask), segcam.Mask(0, other)], layer, method, relu=False
    )
    for network in model.networks:
        network.float()
    expected, _ = _reference(model, case, [(1, mask), (0, other)], layer, method)
    ours = explanation.maps[0]
    assert ours.dtype == torch.float64 and ours.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10 * float(scale))


def test_closed_form_at_the_last_decoder_block(tmp_path):
    """Feeding the 1x1x1 head, HiRes = W (L^c - b_c) on the preprocessed grid (W = E^T M)."""
    folder = make_model_folder(tmp_path / "m", folds=(0, 1), head_bias=(0.3, -0.2, 0.7))
    model = nnunet.load(folder, folds="all")
    for network in model.networks:
        network.double()
    case = nnunet.read_case(model, (_image((17, 22, 19), seed=2), {"spacing": [1.0, 1.0, 1.0]}))
    mask, _ = _boxes(case.original_shape)
    explanation = nnunet.explain(
        model, case, segcam.Mask(2, mask), "decoder.stages.1", relu=False, upsample=False
    )
    # float64 blended logits on the preprocessed grid, written out here
    logits = _preprocessed_logits(model, case)
    bias = np.mean([float(n.decoder.seg_layers[-1].bias.detach()[2]) for n in model.networks])
    weights = case.geometry.from_original(torch.from_numpy(mask)[None].double())[0]
    expected = weights * (logits[2] - bias)
    torch.testing.assert_close(explanation.maps[0, 0], expected, rtol=0, atol=1e-10)
    assert explanation.info["nnunet"]["grid"] == "preprocessed"


def _preprocessed_logits(model, case):
    patch = tuple(model.configuration_manager.patch_size)
    padded, revert = pad_nd_image(case.data.double(), patch, "constant", {"value": 0}, True, None)
    steps = compute_steps_for_sliding_window(padded.shape[1:], patch, 0.5)
    g = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).clone().double()
    axes = model.mirroring_axes
    mirrors = [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    folds = []
    with torch.no_grad():
        for net in model.networks:
            numerator = torch.zeros((3, *padded.shape[1:]), dtype=torch.float64)
            denominator = torch.zeros(padded.shape[1:], dtype=torch.float64)
            for starts in itertools.product(*steps):
                window = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
                x = padded[(slice(None), *window)][None]
                outputs = [
                    torch.flip(net(torch.flip(x, [a + 2 for a in m])), [a + 2 for a in m])
                    for m in mirrors
                ]
                numerator[(slice(None), *window)] += g * torch.stack(outputs).mean(0)[0]
                denominator[window] += g
            folds.append((numerator / denominator)[(slice(None), *revert[1:])])
    return torch.stack(folds).mean(0)


def test_a_small_box_skips_windows(tmp_path):
    model = nnunet.load(make_model_folder(tmp_path / "m"))
    case = nnunet.read_case(model, (_image((40, 20, 20)), {"spacing": [1.0, 1.0, 1.0]}))
    # windows along axis 0 start at 0, 8, 16, 24: a box in 0..5 meets only the first
    box = segcam.Box(1, [(0, 5), (0, 20), (0, 20)])
    explanation = nnunet.explain(model, case, box, "decoder.stages.1")
    info = explanation.info["nnunet"]
    assert info["windows"] == 4 * 2 * 2
    assert info["windows_skipped"] == 3 * 2 * 2
    assert info["backward_passes"] == 4 * 8  # 4 windows x 8 mirrorings, one target
    assert info["forwards"] == 16 * 8  # every window runs once: its logits are blended
    nonzero = explanation.maps[0, 0].abs().sum(dim=(1, 2)) > 0
    assert bool(nonzero[:5].all()) and not bool(nonzero[5:].any())  # the head's closed form


def test_per_fold_maps_sum_to_the_ensemble_and_agreement_is_reported(tmp_path):
    model = nnunet.load(make_model_folder(tmp_path / "m", folds=(0, 1, 2)), folds="all")
    case = nnunet.read_case(model, (_image((18, 20, 22), seed=4), {"spacing": [1.0] * 3}))
    mask, _ = _boxes(case.original_shape)
    explanation = nnunet.explain(
        model, case, segcam.Mask(1, mask), "decoder.stages.0", relu=False, per_fold=True
    )
    members = explanation.members
    assert list(members) == ["fold_0", "fold_1", "fold_2"]
    mean = sum(m.maps for m in members.values()) / 3
    torch.testing.assert_close(mean, explanation.maps, rtol=1e-5, atol=1e-6)
    agreement = explanation.info["nnunet"]["fold_agreement"]["decoder.stages.0"][0]
    assert -1 <= agreement["inside"] <= 1 and -1 <= agreement["around"] <= 1
    # folds with the same weights agree perfectly
    shutil.copy(tmp_path / "m/fold_0/checkpoint_final.pth", tmp_path / "m/fold_1")
    same = nnunet.load(tmp_path / "m", folds=(0, 1))
    again = nnunet.explain(same, case, segcam.Mask(1, mask), "decoder.stages.0", per_fold=True)
    scores = again.info["nnunet"]["fold_agreement"]["decoder.stages.0"][0]
    assert scores["inside"] == pytest.approx(1.0) and scores["around"] == pytest.approx(1.0)


# ---------------------------------------------------------------- bad input, the model untouched


def test_bad_input_is_one_clear_error(tmp_path):
    from segcam.errors import ClassIndexError, OptionError

    folder = make_model_folder(tmp_path / "m")
    model = nnunet.load(folder)
    good = (_image((18, 18, 18)), {"spacing": [1.0, 1.0, 1.0]})
    layer = "decoder.stages.1"
    with pytest.raises(nnunet.NnUNetError, match=r"2 channel\(s\) .* the model takes 1 \(CT\)"):
        nnunet.explain(
            model, (_image((18, 18, 18), channels=2), good[1]), segcam.AllPixels(1), layer
        )
    nan = good[0].copy()
    nan[0, 3, 3, 3] = np.nan
    with pytest.raises(nnunet.NnUNetError, match="NaN or Inf"):
        nnunet.explain(model, (nan, good[1]), segcam.AllPixels(1), layer)
    with pytest.raises(nnunet.NnUNetError, match="no such image file"):
        nnunet.explain(model, [tmp_path / "missing_0000.nii.gz"], segcam.AllPixels(1), layer)
    with pytest.raises(ClassIndexError, match=r"'spleen' is not in dataset\.json; classes: "
                       "background, liver, tumour"):  # fmt: skip
        nnunet.explain(model, good, segcam.Predicted("spleen"), layer)
    with pytest.raises(ClassIndexError, match="class 3 is out of range: the model has 3"):
        nnunet.explain(model, good, segcam.Box(3, [(0, 2)] * 3), layer)
    with pytest.raises(OptionError, match="step_size must be a number in"):
        nnunet.explain(model, good, segcam.AllPixels(1), layer, step_size=0)
    with pytest.raises(OptionError, match="gradient-free methods are not available"):
        nnunet.explain(model, good, segcam.AllPixels(1), layer, "seg-score-cam")
    with pytest.raises(nnunet.NnUNetError, match="an array case needs properties with 'spacing'"):
        nnunet.explain(model, (good[0], {}), segcam.AllPixels(1), layer)


def test_a_cascade_stage_and_a_non_linear_export_are_refused(tmp_path):
    cascade = make_model_folder(tmp_path / "c", previous_stage="3d_lowres")
    case = (_image((18, 18, 18)), {"spacing": [1.0, 1.0, 1.0]})
    with pytest.raises(nnunet.NnUNetError, match="cascade stage: its input includes the "
                       "segmentation of 3d_lowres"):  # fmt: skip
        nnunet.load(cascade)
    folder = make_model_folder(tmp_path / "m")
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["resampling_fn_probabilities_kwargs"]["order"] = 3
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    with pytest.raises(nnunet.NnUNetError, match=r"order 3.*this one is not linear"):
        nnunet.read_case(nnunet.load(folder), case)


def test_a_label_file_mask_and_the_model_left_as_it_was(tmp_path):
    import SimpleITK as sitk  # noqa: N813

    model = nnunet.load(make_model_folder(tmp_path / "m"))
    network = model.networks[0]
    image = _image((17, 19, 18), seed=7)
    mask, _ = _boxes(image.shape[1:])
    path = tmp_path / "truth.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8) * 2), str(path))
    case = (image, {"spacing": [1.0, 1.0, 1.0]})
    from_file = nnunet.explain(model, case, segcam.Mask("liver", str(path)), "decoder.stages.0")
    from_array = nnunet.explain(model, case, segcam.Mask(1, mask), "decoder.stages.0")
    torch.testing.assert_close(from_file.maps, from_array.maps, rtol=0, atol=0)
    assert not network.training
    assert all(p.requires_grad and p.grad is None for p in network.parameters())
    assert all(not m._forward_hooks for m in network.modules())


def test_predicted_targets_batch_the_mirrorings_and_stay_exact(tmp_path):
    """Predicted runs each window's mirrorings as one batch; the maps equal the static path's."""
    from segcam.nnunet.windows import mirror_batch_size, plan_case

    folder = make_model_folder(tmp_path / "m", folds=(0, 1), head_bias=(0.0, 0.0, -1.0))
    model = nnunet.load(folder, folds="all")
    for network in model.networks:
        network.double()
    case = nnunet.read_case(model, (_image((18, 21, 20), seed=9), {"spacing": [1.0] * 3}))
    assert mirror_batch_size(plan_case(model, case, 0.5, True)) == min(8, torch.get_num_threads())
    layer = "decoder.stages.0"
    predicted = nnunet.explain(model, case, segcam.Predicted(1), layer, relu=False)
    fixed = segcam.Mask(1, predicted.pixel_sets[0, 0])
    static = nnunet.explain(model, case, fixed, layer, relu=False)
    scale = float(static.maps.abs().max())
    assert scale > 0 and bool(predicted.pixel_sets.any())
    torch.testing.assert_close(predicted.maps, static.maps, rtol=0, atol=1e-10 * scale)
    info, static_info = predicted.info["nnunet"], static.info["nnunet"]
    assert info["backward_passes"] == static_info["backward_passes"]
    # the prediction pass ran every forward once more
    assert (
        info["forwards"]
        == static_info["forwards"] + 2 * info["windows"] * 8 - 8 * (info["windows_skipped"])
    )


# ---------------------------------------------------------------- the interactive form


@pytest.mark.parametrize("keep_bytes", [2**31, 1])  # every forward kept / none (over budget)
def test_case_explainer_gives_explain_s_maps_from_kept_forwards(tmp_path, keep_bytes):
    """New targets on kept forwards: the maps of a fresh ``explain_methods``, no forward rerun."""
    folder = make_model_folder(tmp_path / "m", folds=(0, 1), head_bias=(0.0, 0.0, -1.0))
    model = nnunet.load(folder, folds="all")
    for network in model.networks:
        network.double()
    # windows along axis 0 start at 0, 8, 16, 24: the two boxes meet different ones
    case = nnunet.read_case(model, (_image((40, 21, 20), seed=3), {"spacing": [1.0] * 3}))
    explainer = nnunet.CaseExplainer(model, case, keep_bytes=keep_bytes)
    assert np.array_equal(
        explainer.prediction.segmentation, nnunet.predict(model, case).segmentation
    )
    mask, other = _boxes(case.original_shape)
    methods = ["seg-hires-grad-cam", "seg-grad-cam"]
    sequence = [
        ("decoder.stages.0", segcam.Mask(2, mask)),
        ("decoder.stages.0", segcam.Mask(1, other)),  # other windows: their forwards now
        ("decoder.stages.0", segcam.Predicted(1)),
        ("decoder.stages.0", segcam.Mask(2, mask)),  # every window it meets is kept
        ("decoder.stages.1", segcam.Box(1, [(0, 9), (0, 21), (0, 20)])),  # a new layer
    ]
    forwards = []
    for layer, target in sequence:
        kept = explainer.explain_methods(target, layer, methods, relu=False)
        fresh = nnunet.explain_methods(model, case, target, layer, methods, relu=False)
        for method in methods:
            scale = float(fresh[method].maps.abs().max())
            assert scale > 0
            torch.testing.assert_close(
                kept[method].maps, fresh[method].maps, rtol=0, atol=1e-10 * scale
            )
            assert torch.equal(kept[method].pixel_sets, fresh[method].pixel_sets)
        forwards.append(kept[methods[0]].info["nnunet"]["forwards"])
        assert kept[methods[0]].info["nnunet"]["backward_passes"] > 0
    if keep_bytes > 1:
        assert forwards[0] > 0 and forwards[1] > 0  # each meets windows the other does not
        assert forwards[3] == 0  # nothing run again: only backward passes
        assert forwards[4] > 0 and explainer.kept_bytes > 0  # a new layer: new forwards
    else:
        assert explainer.kept_bytes == 0 and all(f > 0 for f in forwards)
    explainer.close()
    assert explainer.kept_bytes == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets torch's deprecations
def test_case_explainer_frees_the_forwards_of_layers_it_lets_go(tmp_path):
    # a pack hook that kept the tensor itself made a reference cycle through the retained
    # graph: every layer switch leaked its kept forwards (~2 GB on the demo, issue 23's review)
    import gc

    def live_bytes():
        gc.collect()
        return sum(
            o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor)
        )

    model = nnunet.load(make_model_folder(tmp_path / "m"))
    case = nnunet.read_case(model, (_image((40, 21, 20), seed=5), {"spacing": [1.0] * 3}))
    explainer = nnunet.CaseExplainer(model, case)
    box = segcam.Box(1, [(0, 30), (0, 21), (0, 20)])
    layers = ("decoder.stages.0", "decoder.stages.1", "encoder.stages.1")  # one more than kept
    rounds = []
    for _ in range(3):
        for layer in layers:
            explainer.explain_methods(box, layer, ["seg-grad-cam"])
        rounds.append(live_bytes())
    assert explainer.kept_bytes > 0 and len(explainer._kept) == nnunet.KEPT_LAYERS
    assert rounds[-1] <= rounds[0] + 2**20, rounds
    explainer.close()
    assert explainer.kept_bytes == 0


def test_a_weighted_target_weighs_the_exported_logits_linearly(tmp_path):
    """Weighted(c, a M1 + b M2) = a (M1's maps) + b (M2's maps): the weights reach the windows
    through the export's adjoint exactly as a mask does (float64, raw maps)."""
    model = nnunet.load(make_model_folder(tmp_path / "m"))
    for network in model.networks:
        network.double()
    case = nnunet.read_case(model, (_image((18, 21, 20), seed=6), {"spacing": [1.0] * 3}))
    one, other = (torch.from_numpy(m) for m in _boxes(case.original_shape))
    layer = "decoder.stages.0"
    first, second = (
        nnunet.explain(model, case, segcam.Mask(1, m), layer, relu=False).maps for m in (one, other)
    )
    weights = 0.5 * one.double() - 2.0 * other.double()
    mixed = nnunet.explain(model, case, segcam.Weighted(1, weights), layer, relu=False).maps
    scale = float(first.abs().max() + second.abs().max())
    torch.testing.assert_close(mixed, 0.5 * first - 2.0 * second, rtol=0, atol=1e-10 * scale)
