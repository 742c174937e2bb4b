"""Speed and peak memory of segcam vs the physical limit and vs peers, side by side in one run.

    .venv/bin/python benchmarks/bench_core.py [--quick] [--repeats 5]

The limit: one forward with a hook, one torch.autograd.grad per target to the layer, the map in
one line (gradient recording on for the whole forward, as a user would write it). Each
(configuration, implementation) runs in a fresh subprocess, so peak memory (resident set, CPU) is
its own; time is the median of --repeats calls after one warm-up. Writes
benchmarks/results/core.json and prints ratios: segcam / limit and peer / segcam.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS = {
    "unet2d-256-K1": {"dims": 2, "size": 256, "batch": 1, "targets": 1},
    "unet2d-256-K4": {"dims": 2, "size": 256, "batch": 1, "targets": 4},
    "unet2d-256-K4-B4": {"dims": 2, "size": 256, "batch": 4, "targets": 4},
    "unet3d-64-K1": {"dims": 3, "size": 64, "batch": 1, "targets": 1},
    "unet3d-64-K3": {"dims": 3, "size": 64, "batch": 1, "targets": 3},
}
IMPLEMENTATIONS = ["limit", "segcam-hires", "segcam-grad", "pytorch-grad-cam", "captum"]
LAYER = "model.1.submodule"


def build(config):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    dims, size = config["dims"], config["size"]
    model = UNet(dims, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1).eval()
    x = torch.randn(config["batch"], 1, *([size] * dims))
    masks = [
        (torch.rand(config["batch"], *([size] * dims)) > 0.5) for _ in range(config["targets"])
    ]
    classes = [k % 4 for k in range(config["targets"])]
    return model, x, list(zip(classes, masks, strict=True))


def limit(model, x, targets):
    store = {}
    handle = model.get_submodule(LAYER).register_forward_hook(
        lambda m, i, o: store.setdefault("a", o)
    )
    try:
        logits = model(x)
    finally:
        handle.remove()
    activation = store["a"]
    maps = []
    for k, (c, mask) in enumerate(targets):
        score = (logits[:, c] * mask).sum()
        (gradient,) = torch.autograd.grad(score, activation, retain_graph=k < len(targets) - 1)
        maps.append((gradient * activation).sum(1).detach())
    return maps


def segcam_runner(method):
    import segcam

    def run(model, x, targets):
        return segcam.explain(
            model,
            x,
            [segcam.Mask(c, m) for c, m in targets],
            LAYER,
            method,
            relu=False,
            upsample=False,
        ).maps

    return run


def pytorch_grad_cam(model, x, targets):
    # One call per target (its targets are one per sample); ReLU + min-max + resize are built in.
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    from pytorch_grad_cam import HiResCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    if x.ndim != 4:
        raise NotImplementedError("SemanticSegmentationTarget indexes (K, H, W): 2D only")
    cam = HiResCAM(model=model, target_layers=[model.get_submodule(LAYER)])
    return [
        cam(
            input_tensor=x,
            targets=[
                SemanticSegmentationTarget(c, m[n].float().numpy()) for n in range(x.shape[0])
            ],
        )
        for c, m in targets
    ]


def captum(model, x, targets):
    from captum.attr import LayerGradientXActivation

    maps = []
    for c, mask in targets:  # one forward and backward per target

        def score(inputs, c=c, mask=mask):
            return (model(inputs)[:, c] * mask).flatten(1).sum(1)

        maps.append(LayerGradientXActivation(score, model.get_submodule(LAYER)).attribute(x).sum(1))
    return maps


RUNNERS = {
    "limit": lambda: limit,
    "segcam-hires": lambda: segcam_runner("seg-hires-grad-cam"),
    "segcam-grad": lambda: segcam_runner("seg-grad-cam"),
    "pytorch-grad-cam": lambda: pytorch_grad_cam,
    "captum": lambda: captum,
}


def child(config_name, implementation, repeats):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    config = CONFIGS[config_name]
    run = RUNNERS[implementation]()
    # Warm up code paths (lazy imports, kernels) on a tiny input, so that the peak resident set
    # measured after the baseline is the real input's working memory.
    run(*build({**config, "size": 16, "batch": 1}))
    model, x, targets = build(config)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(model, x, targets)  # warm-up at full size (allocator caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(model, x, targets)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "peak_extra_mib": (peak - baseline) / 1024}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="first two configurations only")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPLEMENTATION"))
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.repeats)
        return
    configs = list(CONFIGS)[:2] if args.quick else list(CONFIGS)
    results = {}
    for name in configs:
        results[name] = {}
        for implementation in IMPLEMENTATIONS:
            process = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    name,
                    implementation,
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if process.returncode != 0:
                reason = process.stderr.strip().splitlines()[-1] if process.stderr else "failed"
                results[name][implementation] = {"error": reason}
                print(f"{name:18s} {implementation:17s} n/a ({reason})", flush=True)
                continue
            measured = json.loads(process.stdout.strip().splitlines()[-1])
            times = measured["times"]
            entry = {
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "peak_extra_mib": measured["peak_extra_mib"],
            }
            results[name][implementation] = entry
            print(
                f"{name:18s} {implementation:17s} median {entry['median_s'] * 1e3:8.1f} ms "
                f"[{entry['min_s'] * 1e3:.1f}, {entry['max_s'] * 1e3:.1f}]  "
                f"peak +{entry['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
    print("\nratios (median time; peak memory):")
    for name, row in results.items():
        ours = row.get("segcam-hires", {})
        base = row.get("limit", {})
        if "median_s" not in ours or "median_s" not in base:
            continue
        line = [
            f"segcam/limit {ours['median_s'] / base['median_s']:.2f}x time, "
            f"{ours['peak_extra_mib'] / max(base['peak_extra_mib'], 1):.2f}x memory"
        ]
        for peer in ("pytorch-grad-cam", "captum"):
            if "median_s" in row.get(peer, {}):
                line.append(f"{peer}/segcam {row[peer]['median_s'] / ours['median_s']:.2f}x")
        print(f"  {name:18s} " + "; ".join(line))
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / "core.json"
    output.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                },
                "layer": LAYER,
                "repeats": args.repeats,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
