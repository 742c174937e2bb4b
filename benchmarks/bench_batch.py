"""Throughput of the batch backends on one machine: inputs per second, side by side.

    .venv/bin/python benchmarks/bench_batch.py [--inputs 96]

Synthetic 64 x 64 scenes, the synthetic demo UNet, 2 methods x 2 layers x 2 targets, PNG and
.npz outputs per input. Runs: local with 1 process, local with 2 processes, Ray with 2 actors
(a local cluster started for the run, its start-up timed separately). Writes
benchmarks/results/batch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segcam.apps.batch import BatchJob, explain_files
from segcam.apps.demo.models import WEIGHTS_DIR
from segcam.testing.synthetic import shapes_scene

RESULTS = Path(__file__).resolve().parent / "results"
JOB = BatchJob(
    model="segcam.apps.demo.models:build_demo_model",
    weights=str(WEIGHTS_DIR / "synthetic_unet2d.pt"),
    targets=("predicted:1", "box:2:4,4,40,50"),
    layers=("model.1.submodule.2", "model.1.submodule"),
    methods=("seg-grad-cam", "seg-hires-grad-cam"),
    intensity={"window": (-50.0, 250.0), "zscore": False, "minmax": False},
    explain={"relu": True, "upsample": True, "normalize": None, "output": None},
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=96)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scans = Path(folder) / "scans"
        scans.mkdir()
        for seed in range(args.inputs):
            image, _ = shapes_scene(3_000_000 + seed)
            np.save(scans / f"scan{seed:03d}.npy", image[0] * 100.0)
        runs = [("local, 1 process", "local", 1), ("local, 2 processes", "local", 2)]
        for name, backend, workers in runs:
            started = time.perf_counter()
            result = explain_files(
                [scans], JOB, Path(folder) / name, backend=backend, num_workers=workers
            )
            seconds = time.perf_counter() - started
            rows.append({"run": name, "seconds": seconds, "done": len(result.done)})
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start_up = time.perf_counter() - started
        started = time.perf_counter()
        result = explain_files([scans], JOB, Path(folder) / "ray", backend="ray", num_workers=2)
        seconds = time.perf_counter() - started
        ray.shutdown()
        rows.append(
            {
                "run": "ray, 2 actors",
                "seconds": seconds,
                "done": len(result.done),
                "cluster_start_seconds": start_up,
            }
        )
    base = rows[0]["seconds"]
    for row in rows:
        row["inputs_per_second"] = row["done"] / row["seconds"]
        row["speed_up"] = base / row["seconds"]
        extra = (
            f" (+{row['cluster_start_seconds']:.1f} s cluster start)"
            if "cluster_start_seconds" in row
            else ""
        )
        print(
            f"{row['run']:20s} {row['seconds']:6.1f} s  {row['inputs_per_second']:5.2f} inputs/s  "
            f"x{row['speed_up']:.2f}{extra}",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (RESULTS / "batch.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"written {RESULTS / 'batch.json'}")


if __name__ == "__main__":
    main()
