"""MONAI bundle explanations: time and peak memory against the bundle's own inference.

    .venv/bin/python benchmarks/bench_bundle.py [--repeats 3] [--shape 192 192 128]

The setup: a bundle folder in the Model Zoo's layout (``segcam.testing.bundles``) with the
spleen CT bundle's network (MONAI UNet, channels 16-256, 2 residual units, batch norm; random
weights), its preprocessing (RAS, 1.5 x 1.5 x 2 mm, the intensity window), its inferer (96^3
windows, 4 per batch, overlap 0.5, constant blending) and its postprocessing (softmax, Invertd,
argmax), on a CT-like NIfTI of ``--shape`` voxels at 1.5 x 1.5 x 2 mm.

Contenders, timed in this process interleaved (median of ``--repeats``, after a warm-up) and
measured for memory in a fresh process (the peak resident-set growth of a second run, sampled
every 2 ms):

- ``bundle``: the bundle's own inference, what ``monai.bundle.run`` computes for one image:
  its preprocessing, its ``SlidingWindowInferer``, its postprocessing (writing left out):
  ``segcam.monai.predict(bundle, segcam.monai.read_case(bundle, image))``;
- ``segcam``: ``segcam.monai.explain_and_predict`` for ``Predicted(1)`` with Seg-HiRes-Grad CAM
  and Seg-Grad CAM at ``model.1.submodule.2``, maps on the original grid (preprocessing
  included);
- ``segcam, no kept forwards``: the same with ``keep_bytes=0`` (a prediction pass, then a
  recorded forward per window): what keeping the prediction's forwards (2 GiB) saves, and
  costs.

Writes benchmarks/results/bundle.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("bundle", "segcam", "segcam, no kept forwards")
LAYER = "model.1.submodule.2"
SPLEEN = {
    "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
    "norm": "batch",
}  # fmt: skip
INFERER = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4,
           "overlap": 0.5}  # fmt: skip


def _rss_now() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize()


def prepare(work: Path, shape: list[int]) -> dict:
    """Write the bundle folder and the CT; return where they are."""
    from segcam.testing.bundles import write_bundle, write_oblique_ct

    folder = write_bundle(work / "spleen_ct_segmentation", network=SPLEEN, inferer=INFERER)
    image = write_oblique_ct(work / "ct.nii.gz", shape, spacing=(1.5, 1.5, 2.0), angle=0.0)
    return {"folder": str(folder), "image": str(image), "shape": shape}


def _contender(kind: str, spec: dict):
    """Load the bundle; return a zero-argument function that runs ``kind`` once."""
    warnings.filterwarnings("ignore")
    import segcam
    from segcam import monai

    bundle = monai.load_bundle(spec["folder"])
    if kind == "bundle":
        return lambda: monai.predict(bundle, monai.read_case(bundle, spec["image"]))
    keep = {"keep_bytes": 0} if kind == "segcam, no kept forwards" else {}
    return lambda: monai.explain_and_predict(
        bundle, spec["image"], segcam.Predicted(1), LAYER, ["seg-hires-grad-cam", "seg-grad-cam"],
        **keep,
    )  # fmt: skip


def child(kind: str, spec: dict) -> dict:
    """Peak memory of a second run (sampled every 2 ms), after a first one."""
    import gc

    run = _contender(kind, spec)
    run()
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
    if isinstance(result, tuple):
        info = result[0]["seg-hires-grad-cam"].info["monai_bundle"]["windows"]
    return {"peak_growth_bytes": max(samples) - base, "info": info}


def timed(spec: dict, repeats: int) -> dict[str, list[float]]:
    """Each contender's times, interleaved (A, B, C, A, B, C, ...) after a warm-up of each."""
    runs = {kind: _contender(kind, spec) for kind in KINDS}
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(repeats):
        for kind, run in runs.items():
            started = time.perf_counter()
            run()
            times[kind].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=[192, 192, 128])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_bundle_"))
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": args.shape,
        "rows": {},
    }
    try:
        spec = prepare(work, args.shape)
        rows = report["rows"]
        all_times = timed(spec, args.repeats)
        for kind in KINDS:
            times = all_times[kind]
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
                f"{kind:26s} {statistics.median(times):8.2f} s  "
                f"{rows[kind]['peak_growth_mib']:8.1f} MiB",
                flush=True,
            )
        base = rows["bundle"]
        report["ratios"] = {
            f"{kind} / bundle": {
                "time": rows[kind]["median_seconds"] / base["median_seconds"],
                "memory": rows[kind]["peak_growth_mib"] / max(base["peak_growth_mib"], 1e-9),
            }
            for kind in KINDS[1:]
        }
        for name, values in report["ratios"].items():
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bundle.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / 'bundle.json'}")


if __name__ == "__main__":
    main()
