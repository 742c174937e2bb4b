"""nnU-Net explanations: time and peak memory against nnU-Net's own prediction and nnunetv2-cam.

    .venv/bin/python benchmarks/bench_nnunet.py [--repeats 3] [--setups demo tiny]

Setups (same folds, mirroring and step size 0.5 for every contender):

- ``demo``: the committed nnU-Net model (``segcam/apps/demo/nnunet_model``, fold ``all``, patch
  24x64x64) on the demo CT's held-out slab (24x128x128; ``make data``), 9 windows;
- ``demo27``: the same model on 48 slices of the demo CT (48x128x128), 27 windows;
- ``tiny``: a random-weight model folder of ``segcam.testing.nnunet`` (two folds, patch 32^3) on
  a random CT-like case of 48x96x96.

Contenders, each timed in this process (median of ``--repeats``, after a warm-up) and measured
for memory in a fresh process: the peak resident-set growth of a second run over the process
after a first one (sampled every 2 ms: the run's working set), and the first run's growth over
the process after loading the model and reading the case (imports and caches made on first
use included):

- ``nnunet``: ``nnUNetPredictor.predict_single_npy_array`` (preprocessing, prediction, export);
- ``segcam static``: ``segcam.nnunet.explain`` for a Box target (a central box of a quarter of
  each axis), Seg-HiRes-Grad CAM at the last decoder stage, maps on the original grid;
- ``segcam predicted``: the same for ``Predicted(1)`` (nnU-Net's prediction first, then the
  explanation pass over the windows that meet the predicted set);
- ``nnunetv2-cam``: ``nnunetv2_cam.api.run_cam_for_prediction`` (0.1.6.1; Grad-CAM per patch
  with pytorch-grad-cam, min-max normalised patch maps averaged) for class 1, from the case's
  file, no slice images. It computes something else: its target sums the logits of all classes
  inside its mask, mirroring is used only for the mask, and folds are averaged after per-patch
  normalisation. Installed only here (``make bench-nnunet``); skipped when missing.

Writes benchmarks/results/nnunet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = (
    "nnunet",
    "segcam static",
    "segcam predicted",
    "segcam static contiguous",
    "segcam predicted contiguous",
    "nnunetv2-cam",
)
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")  # set by --device


def _rss_now() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fake_torchvision_ops():
    import torch

    if not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "FRAGMENT")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        _fake_torchvision_ops.library = library


def prepare(setup: str, work: Path) -> dict:
    """Write the setup's model folder (tiny) and case file; return where they are."""
    import numpy as np
    import SimpleITK as sitk  # noqa: N813

    if setup in ("demo", "demo27"):
        from segcam.apps.demo.data import load_case
        from segcam.apps.demo.models import NNUNET_MODEL

        case = load_case()
        slab = slice(56, 80) if setup == "demo" else slice(44, 92)  # 9 or 27 windows
        volume = case.image[:, :, slab].astype(np.float32).transpose(2, 1, 0)
        folder, folds, layer = NNUNET_MODEL, ["all"], "decoder.stages.2"
    else:
        from segcam.testing.nnunet import make_model_folder

        folder = make_model_folder(
            work / "tiny", folds=(0, 1), patch_size=(32, 32, 32), head_bias=(0.0, 0.2, -1.0)
        )
        rng = np.random.default_rng(0)
        volume = (rng.standard_normal((48, 96, 96)) * 200 + 50).astype(np.float32)
        folds, layer = [0, 1], "decoder.stages.1"
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.0, 1.0))
    case = work / f"{setup}_0000.nii.gz"
    sitk.WriteImage(image, str(case))
    return {
        "folder": str(folder),
        "folds": folds,
        "layer": layer,
        "case": str(case),
        "shape": list(volume.shape),
    }


def _fold(value):
    return int(value) if str(value).isdigit() else value


def _contender(kind: str, spec: dict):
    """Load what ``kind`` needs; return a zero-argument function that runs it once."""
    import torch

    warnings.filterwarnings("ignore")
    _fake_torchvision_ops()  # nnU-Net's trainer lookup imports timm's variants (torchvision)
    folds = tuple(_fold(f) for f in spec["folds"])
    if kind == "nnunet" or kind == "nnunetv2-cam":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_mirroring=True,
            device=torch.device(DEVICE),
            perform_everything_on_device=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(spec["folder"], use_folds=folds)
        reader = predictor.plans_manager.image_reader_writer_class()
        image, properties = reader.read_images([spec["case"]])
        if kind == "nnunet":
            return lambda: predictor.predict_single_npy_array(image, dict(properties))
        from nnunetv2_cam.api import run_cam_for_prediction

        out = tempfile.mkdtemp()
        return lambda: run_cam_for_prediction(
            predictor,
            spec["case"],
            out,
            spec["layer"],
            target_class=1,
            method="gradcam",
            cam_type="3d",
            device=torch.device(DEVICE),
            save_slices=False,
        )
    import segcam
    from segcam import nnunet

    model = nnunet.load(spec["folder"], folds=folds, device=torch.device(DEVICE))
    case = nnunet.read_case(model, [spec["case"]])
    shape = case.original_shape
    box = [(s // 2 - max(s // 8, 1), s // 2 + max(s // 8, 1)) for s in shape]
    target = segcam.Box(1, box) if kind.startswith("segcam static") else segcam.Predicted(1)
    layout = "contiguous" if kind.endswith("contiguous") else "auto"
    return lambda: nnunet.explain(model, case, target, spec["layer"], memory_format=layout)


def child(kind: str, spec: dict) -> dict:
    """Peak memory of one run: the first call's (high-water mark, imports and caches made on
    first use included) and a second call's (sampled every 2 ms: the run's own working set)."""
    import gc
    import threading

    run = _contender(kind, spec)
    base = _rss_now()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    first_growth = _peak() - base
    gc.collect()
    base = _rss_now()
    samples = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(_rss_now())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = run()
    done.set()
    thread.join()
    info = {}
    if hasattr(result, "info"):
        info = {
            k: result.info["nnunet"][k]
            for k in ("windows", "forwards", "backward_passes", "windows_skipped")
        }
    return {
        "seconds": seconds,
        "peak_growth_bytes": max(samples) - base,
        "first_call_growth_bytes": first_growth,
        "info": info,
    }


def timed(kind: str, spec: dict, repeats: int) -> list[float]:
    run = _contender(kind, spec)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def available(kind: str) -> bool:
    if kind != "nnunetv2-cam":
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("nnunetv2_cam") is not None
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", nargs="+", default=["demo", "demo27", "tiny"])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (results: nnunet_cuda.json)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = os.environ["BENCH_DEVICE"] = args.device  # the children read it
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    import torch

    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "setups": {},
    }
    try:
        for setup in args.setups:
            spec = prepare(setup, work)
            rows = {}
            for kind in args.kinds:
                if not available(kind):
                    rows[kind] = {"skipped": "nnunetv2-cam not installed (make bench-nnunet)"}
                    continue
                times = timed(kind, spec, args.repeats)
                measured = subprocess.run(
                    [sys.executable, __file__, "--child", kind, json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                memory = json.loads(measured.stdout.strip().splitlines()[-1])
                rows[kind] = {
                    "median_seconds": statistics.median(times),
                    "seconds": times,
                    "peak_growth_mib": memory["peak_growth_bytes"] / 2**20,
                    "info": memory["info"],
                }
                print(
                    f"{setup:5s} {kind:17s} {statistics.median(times):8.2f} s  "
                    f"{rows[kind]['peak_growth_mib']:8.1f} MiB",
                    flush=True,
                )
            base = rows["nnunet"]
            ratios = {
                f"{kind} / nnunet": {
                    "time": rows[kind]["median_seconds"] / base["median_seconds"],
                    "memory": rows[kind]["peak_growth_mib"] / max(base["peak_growth_mib"], 1e-9),
                }
                for kind in args.kinds
                if kind != "nnunet" and "median_seconds" in rows[kind]
            }
            if "median_seconds" in rows.get("nnunetv2-cam", {}):
                ratios["nnunetv2-cam / segcam predicted"] = {
                    "time": rows["nnunetv2-cam"]["median_seconds"]
                    / rows["segcam predicted"]["median_seconds"]
                }
            for name, values in ratios.items():
                text = ", ".join(f"{k} {v:.2f}x" for k, v in values.items())
                print(f"{setup:5s} {name}: {text}")
            report["setups"][setup] = {
                "spec": {k: v for k, v in spec.items() if k != "case"},
                "rows": rows,
                "ratios": ratios,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    name = "nnunet.json" if args.device == "cpu" else "nnunet_cuda.json"
    (RESULTS / name).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
