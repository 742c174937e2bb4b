"""``segcam evaluate --nnunet/--bundle``: the user's own model scored through its own pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import segcam
from segcam.apps.cli import main

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning"),
]


def _records(out, name):
    return json.loads((out / f"{name}_records.json").read_text())


def test_an_nnunet_model_on_its_labelled_cases(tmp_path, capsys):
    pytest.importorskip("nnunetv2")
    import SimpleITK as sitk  # noqa: N813

    from segcam import nnunet
    from segcam.apps.evaluation.pipelines import nnunet_cases
    from segcam.metrics import energy_inside
    from segcam.testing.nnunet import make_model_folder

    folder = make_model_folder(tmp_path / "model", folds=(0, 1), head_bias=(0.0, 0.2, -0.4))
    raw, labels = tmp_path / "raw", tmp_path / "labels"
    raw.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.standard_normal((12, 18, 16)) * 300).astype(np.float32))
    sitk.WriteImage(image, str(raw / "liver_1_0000.nii.gz"))
    model = nnunet.load(folder, folds="all")
    files = [str(raw / "liver_1_0000.nii.gz")]
    truth = nnunet.predict(model, files, mirroring=False).segmentation.astype(np.uint8)
    truth[:, :4] = 2  # not only the prediction: a tumour slab of the truth's own
    case = nnunet.read_case(model, files)
    writer = model.plans_manager.image_reader_writer_class()
    writer.write_seg(truth, str(labels / "liver_1.nii.gz"), case.properties)
    layer = "decoder.stages.1"
    arguments = ["evaluate", "--nnunet", str(folder), "--data", str(raw), "--labels",
                 str(labels), "--layer", layer, "--methods", "seg-hires-grad-cam",
                 "seg-grad-cam", "--steps", "2", "--disable-tta", "--seed", "3"]  # fmt: skip
    assert main([*arguments, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "deletion and insertion run the pipeline 24 times (2 steps" in err  # said first
    records = _records(tmp_path / "a", "nnunet_model")
    assert {r["target"] for r in records} == {"liver (class 1)", "tumour (class 2)"}
    assert {r["method"] for r in records} == {"seg-hires-grad-cam", "seg-grad-cam"}
    # the energy is the map's share inside the truth: recomputed from nnU-Net's explanation
    explanation = nnunet.explain(model, files, segcam.Predicted(2), layer, mirroring=False)
    expected = float(energy_inside(explanation.maps[:, 0], torch.from_numpy(truth == 2)[None]))
    hires = next(r for r in records if r["method"] == "seg-hires-grad-cam" and r["target"] ==
                 "tumour (class 2)")  # fmt: skip
    assert hires["energy in ground truth"] == pytest.approx(expected, abs=1e-6)
    for record in records:
        assert -1 <= record["Spearman, all randomised"] <= 1
        assert np.isfinite(record["deletion AUC"]) and np.isfinite(record["insertion AUC"])
        assert "fold agreement (inside)" in record  # two folds
    # the pipeline deletion perturbs is nnU-Net's own prediction and export
    (pipeline_case,) = nnunet_cases(folder, raw, labels, mirroring=False)
    exported = nnunet.predict(model, files, mirroring=False).original_logits()
    torch.testing.assert_close(pipeline_case.predict(pipeline_case.inputs)[0], exported)
    # the same seed, the same numbers
    assert main([*arguments, "--out", str(tmp_path / "b")]) == 0
    assert _records(tmp_path / "b", "nnunet_model") == records
    summary = (tmp_path / "a" / "nnunet_model.md").read_text()
    assert "deletion AUC" in summary and "Spearman, all randomised" in summary


def test_a_bundle_on_its_labelled_images(tmp_path, capsys):
    pytest.importorskip("monai")
    import nibabel as nib

    from segcam.monai import load_bundle, predict, read_case
    from segcam.testing.bundles import write_bundle, write_oblique_ct

    folder = write_bundle(tmp_path / "spleen", seed=4)
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    ct = write_oblique_ct(images / "ct.nii.gz", seed=1)
    bundle = load_bundle(folder)
    predicted = predict(bundle, read_case(bundle, ct)).labels.numpy().astype(np.uint8)
    nib.save(nib.Nifti1Image(predicted, nib.load(ct).affine), labels / "ct.nii.gz")
    code = main(["evaluate", "--bundle", str(folder), "--data", str(images), "--labels",
                 str(labels), "--layer", "model.1.submodule", "--methods", "seg-hires-grad-cam",
                 "--steps", "2", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (record,) = _records(tmp_path / "out", "bundle_spleen")
    assert record["target"] == "spleen (class 1)"
    # the truth is the bundle's own prediction: the map's positive mass lies mostly inside it
    assert 0 < record["energy in ground truth"] <= 1
    assert np.isfinite(record["deletion AUC"]) and -1 <= record["Spearman, half randomised"] <= 1
    # a case without a class in its truth is skipped, said; a label the model lacks is refused
    images2, labels2 = tmp_path / "images2", tmp_path / "labels2"
    images2.mkdir()
    labels2.mkdir()
    write_oblique_ct(images2 / "a.nii.gz", seed=2)
    write_oblique_ct(images2 / "b.nii.gz", seed=3)
    affine = nib.load(ct).affine
    nib.save(nib.Nifti1Image(np.zeros_like(predicted), affine), labels2 / "a.nii.gz")
    nib.save(nib.Nifti1Image(predicted, affine), labels2 / "b.nii.gz")
    common = ["evaluate", "--bundle", str(folder), "--data", str(images2), "--labels",
              str(labels2), "--layer", "model.1.submodule", "--methods", "seg-hires-grad-cam",
              "--steps", "1", "--out", str(tmp_path / "out2")]  # fmt: skip
    capsys.readouterr()
    assert main(common) == 0
    assert "a.nii.gz: no class in its label file: skipped" in capsys.readouterr().err
    assert [r["sample"] for r in _records(tmp_path / "out2", "bundle_spleen")] == ["b.nii.gz"]
    nib.save(nib.Nifti1Image(predicted * 7, affine), labels2 / "b.nii.gz")
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz: its label file holds label 7, but the model has 2 classes" in err
    assert "deletion and insertion run" not in err  # refused before any work
    # one clear line for what is missing
    assert main(["evaluate", "--bundle", str(folder), "--data", str(images), "--layer",
                 "model.1.submodule"]) == 2  # fmt: skip
    assert "need --data FOLDER" in capsys.readouterr().err
