"""Train the demo's nnU-Net v2 model with nnU-Net's own planning, preprocessing and training.

    .venv/bin/python scripts/train_nnunet.py --work /tmp/nnunet-work \
        --out src/segcam/apps/demo/nnunet_model --log scripts/train_nnunet.log.json

Data: the demo CT (case 117, LiTS-derived; ``segcam.apps.demo.data``), 1 mm isotropic. Cases are
slabs of 24 axial slices cut from the training slices (0..47 and 88..127): 0..23, 24..47,
88..111 and 104..127; the held-out slab 56..79 is never seen in training and is the test case.
Files are written as nnU-Net raw data (``Dataset501_LiverDemo``, NIfTI through SimpleITK, axial
slices along the image's z axis), then:

1. ``extract_fingerprints`` and ``plan_experiments`` (nnU-Net's default planner);
2. a smaller plan than nnU-Net would choose, so that a CPU trains it in minutes: the
   ``3d_fullres`` configuration only, patch (24, 64, 64), a PlainConvUNet of 4 stages with
   8, 16, 32, 64 features (the plan's other settings, normalisation included, stay nnU-Net's);
3. ``preprocess`` with nnU-Net's default preprocessor;
4. ``run_training`` on fold ``all`` (every training case; 4 cases are too few for 5 folds) with
   nnU-Net's ``nnUNetTrainer_10epochs`` (nnU-Net's training with 10 epochs of 250 iterations);
5. held-out Dice of nnU-Net's own prediction (``nnUNetPredictor``, mirroring on) of the
   held-out slab, per class.

The model folder is copied to ``--out`` with ``plans.json``, ``dataset.json``,
``dataset_fingerprint.json`` and ``fold_all/checkpoint_final.pth``, the checkpoint reduced to
what inference reads (network weights, trainer name, init args, mirroring axes; the optimiser
state is dropped). Fixed seeds; nnU-Net's data augmentation runs in worker processes, so a rerun
gives close, not identical, weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

DATASET_ID = 501
DATASET = "Dataset501_LiverDemo"
TRAIN_SLABS = ((0, 24), (24, 48), (88, 112), (104, 128))
TEST_SLAB = (56, 80)
PATCH = (24, 64, 64)
TRAINER = "nnUNetTrainer_10epochs"


def _write_image(path: Path, volume: np.ndarray) -> None:
    import SimpleITK as sitk  # noqa: N813

    # axis 2 of the demo volume is axial: it becomes the image's z axis (the array's first)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path), True)


def write_raw(raw: Path) -> None:
    """The demo CT as nnU-Net raw data: four training slabs and the held-out slab."""
    from segcam.apps.demo.data import CLASS_NAMES, load_case

    case = load_case()
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index, (start, stop) in enumerate(TRAIN_SLABS):
        name = f"liver_{index:02d}"
        _write_image(
            folder / "imagesTr" / f"{name}_0000.nii.gz",
            case.image[:, :, start:stop].astype(np.float32),
        )
        _write_image(
            folder / "labelsTr" / f"{name}.nii.gz", case.labels[:, :, start:stop].astype(np.uint8)
        )
    start, stop = TEST_SLAB
    _write_image(
        folder / "imagesTs" / "heldout_0000.nii.gz", case.image[:, :, start:stop].astype(np.float32)
    )
    _write_image(
        folder / "labelsTs" / "heldout.nii.gz", case.labels[:, :, start:stop].astype(np.uint8)
    )
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {name: index for index, name in enumerate(CLASS_NAMES)},
        "numTraining": len(TRAIN_SLABS),
        "file_ending": ".nii.gz",
        "name": "LiverDemo",
        "description": "segcam demo: slabs of one LiTS-derived CT (case 117), 1 mm assumed",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")


def smaller_plan(plans: dict[str, Any]) -> dict[str, Any]:
    """Keep 3d_fullres only, with a small patch and a small PlainConvUNet."""
    configuration = plans["configurations"]["3d_fullres"]
    configuration["patch_size"] = list(PATCH)
    configuration["batch_size"] = 2
    kwargs = configuration["architecture"]["arch_kwargs"]
    kwargs.update(
        n_stages=4,
        features_per_stage=[8, 16, 32, 64],
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        n_conv_per_stage=[2, 2, 2, 2],
        n_conv_per_stage_decoder=[2, 2, 2],
    )
    plans["configurations"] = {"3d_fullres": configuration}
    return plans


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice of one label (1.0 when both are empty)."""
    a, b = prediction == label, truth == label
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (nnUNet_*)")
    parser.add_argument("--out", type=Path, required=True, help="where the model folder goes")
    parser.add_argument("--log", type=Path, required=True, help="the training log (JSON)")
    parser.add_argument("--trainer", default=TRAINER, help="an nnU-Net trainer class name")
    args = parser.parse_args()

    work = args.work.resolve()
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
    # nnU-Net reads its folders from the environment when it is imported
    os.environ["nnUNet_raw"] = str(work / "raw")  # noqa: SIM112 - nnU-Net's own names
    os.environ["nnUNet_preprocessed"] = str(work / "preprocessed")  # noqa: SIM112
    os.environ["nnUNet_results"] = str(work / "results")  # noqa: SIM112
    os.environ.setdefault("nnUNet_compile", "false")
    os.environ.setdefault("nnUNet_n_proc_DA", "2")

    import torch

    # nnU-Net's trainer lookup imports every trainer variant, some of them timm and torchvision;
    # a CPU torch with PyPI's CUDA torchvision lacks two ops: define them (never called here)
    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "FRAGMENT")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    torch.manual_seed(0)
    np.random.seed(0)
    started = time.perf_counter()
    write_raw(work / "raw")

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([DATASET_ID])
    plans_file = work / "preprocessed" / DATASET / "nnUNetPlans.json"
    plans = smaller_plan(json.loads(plans_file.read_text(encoding="utf-8")))
    plans_file.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(2,))
    prepared = time.perf_counter()

    from nnunetv2.run.run_training import run_training

    run_training(str(DATASET_ID), "3d_fullres", "all", args.trainer, device=torch.device("cpu"))
    trained = time.perf_counter()

    result = work / "results" / DATASET / f"{args.trainer}__nnUNetPlans__3d_fullres"
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(result / name, out / name)
    checkpoint = torch.load(
        result / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    kept = {
        key: checkpoint[key]
        for key in (
            "network_weights",
            "trainer_name",
            "init_args",
            "current_epoch",
            "inference_allowed_mirroring_axes",
        )
        if key in checkpoint
    }
    kept["init_args"] = {k: v for k, v in kept["init_args"].items() if k != "plans"}
    torch.save(kept, out / "fold_all" / "checkpoint_final.pth")

    import SimpleITK as sitk  # noqa: N813
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(str(out), use_folds=("all",))
    test = work / "raw" / DATASET / "imagesTs"
    predicted = work / "heldout_prediction"
    predictor.predict_from_files(
        str(test),
        str(predicted),
        num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(test.parent / "labelsTs/heldout.nii.gz")))
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / "heldout.nii.gz")))
    log = {
        "trainer": args.trainer,
        "dataset": DATASET,
        "train_slabs": [list(s) for s in TRAIN_SLABS],
        "held_out_slab": list(TEST_SLAB),
        "patch_size": list(PATCH),
        "parameters": sum(v.numel() for v in kept["network_weights"].values()),
        "held_out_dice": {
            "liver": dice(segmentation, truth, 1),
            "tumour": dice(segmentation, truth, 2),
        },
        "checkpoint_bytes": (out / "fold_all" / "checkpoint_final.pth").stat().st_size,
        "seconds": {
            "prepare": round(prepared - started, 1),
            "train": round(trained - prepared, 1),
        },
        "torch": torch.__version__,
    }
    args.log.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
