"""Sliding-window explanations: time and peak memory against sliding-window inference itself.

    .venv/bin/python benchmarks/bench_sliding.py [--sizes 96 128 256 512x512x300] [--quick]
                                                 [--device cuda]

A 3D MONAI UNet (the demo's architecture: channels 8-16-32-64, strides 2) on a random volume,
windows of 96^3, overlap 0.25, Gaussian blending, one window per forward. Each run is a fresh
process (peak resident-set growth over the process after building model and volume is its
own):

- ``inference``: MONAI's ``sliding_window_inference`` without gradients;
- ``inference+grad``: the same with gradients enabled (what a hand-written explanation would
  differentiate): its graph spans every window, so its memory grows with the volume; it runs
  under a 20 GiB address-space cap and is reported as out of memory when it does not fit;
- ``segcam box``: ``explain_sliding_window`` for a Mask target (a box of 64^3 in the middle):
  one pass, backward only for the windows that meet it;
- ``segcam predicted``: for ``Predicted(1)``: the prediction's forwards recorded and kept within
  the default budget (2 GiB), then the backward passes of the windows that meet the predicted
  region (here: all), a forward again for those not kept;
- ``segcam predicted keep 0``: the same with ``keep_bytes=0``: a prediction pass without
  gradients, then one group of windows' graph at a time.

Both explanations use Seg-HiRes-Grad CAM at the last decoder block (the default memory
layout). Each segcam row also gives its growth above the arrays any explanation of the volume
must hold (the input, the blended logits, the map at the layer's resolution and the targets'
weights): the rest is the one group of windows' graph at a time. Writes
benchmarks/results/sliding.json (sliding_cuda.json with --device cuda) and scaling.png (time
and peak memory against the voxel count).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROI = 96
LAYER = "model.1.submodule.2"
CAP_BYTES = 20 * 2**30
KINDS = ("inference", "inference+grad", "segcam box", "segcam predicted", "segcam predicted keep 0")


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _window_group_bytes(model, device):
    """What one window's recorded forward holds (its saved tensors), measured on one window."""
    import torch

    import segcam

    saved = {}

    def pack(tensor):
        saved[tensor.data_ptr(), tensor.numel()] = tensor.numel() * tensor.element_size()
        return tensor

    window = torch.randn((1, 1, ROI, ROI, ROI), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        segcam.explain(model, window, segcam.AllPixels(1), LAYER, upsample=False)
    return sum(saved.values())


def child(size, kind, device_name="cpu"):
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    import segcam

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = UNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1).eval()
    model = model.to(device)
    volume = torch.randn((1, 1, *size), device=device)
    mask = torch.zeros(size, dtype=torch.bool, device=device)  # the user's pixel set
    mask[tuple(slice(s // 2 - 32, s // 2 + 32) for s in size)] = True
    group = _window_group_bytes(model, device) if kind.startswith("segcam") else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cuda_base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    base = _rss_bytes()
    started = time.perf_counter()
    info = {}
    if kind == "inference":
        with torch.no_grad():
            sliding_window_inference(volume, ROI, 1, model, overlap=0.25, mode="gaussian")
    elif kind == "inference+grad":
        resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))
        try:
            with torch.enable_grad():
                out = sliding_window_inference(volume, ROI, 1, model, overlap=0.25, mode="gaussian")
                info["graph"] = bool(out.requires_grad)
        except (MemoryError, RuntimeError) as error:
            return {"out_of_memory": f"{type(error).__name__}: {str(error)[:120]}"}
    else:
        target = segcam.Mask(1, mask) if kind == "segcam box" else segcam.Predicted(1)
        keep = {"keep_bytes": 0} if kind.endswith("keep 0") else {}
        expl = segcam.explain_sliding_window_methods(
            model, volume, target, LAYER, ROI, ["seg-hires-grad-cam"], overlap=0.25,
            mode="gaussian", upsample=False, **keep,
        )["seg-hires-grad-cam"]  # fmt: skip
        info = dict(expl.info["sliding_window"])
        voxels = 1
        for s in size:
            voxels *= s
        # the input, the blended logits (3 classes), the layer-resolution map and accumulators
        # of the one target, the target's weights: float32 each, the volume's own arrays
        info["output_arrays_bytes"] = 4 * voxels * (1 + 3 + 1) + 4 * expl.maps.numel() * 2
        info["window_group_bytes"] = group
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    growth = (
        torch.cuda.max_memory_allocated() - cuda_base
        if device.type == "cuda"
        else _rss_bytes() - base
    )
    result = {"seconds": seconds, "peak_growth_bytes": growth, **info}
    if "output_arrays_bytes" in info:
        result["above_output_arrays_bytes"] = growth - info["output_arrays_bytes"]
    return result


def run(size, kind, device="cpu"):
    command = [sys.executable, __file__, "--child", "x".join(map(str, size)), kind]
    command += ["--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"failed": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["96", "128", "256", "512x512x300"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a 160^3 volume only")
    args = parser.parse_args()
    if args.child:
        size = tuple(int(v) for v in args.child[0].split("x"))
        print(json.dumps(child(size, args.child[1], args.device)), flush=True)
        return
    sizes = ["160"] if args.quick else args.sizes
    rows = []
    for text in sizes:
        parts = [int(v) for v in text.split("x")]
        size = tuple(parts * 3 if len(parts) == 1 else parts)
        measured = {kind: run(size, kind, args.device) for kind in KINDS}
        row = {"size": list(size), **measured}
        grad = measured["inference+grad"].get("seconds")
        for kind in KINDS[2:]:
            result = measured[kind]
            if "seconds" in result:
                result["over_inference"] = result["seconds"] / measured["inference"]["seconds"]
                if grad:
                    result["over_inference_with_grad"] = result["seconds"] / grad
        rows.append(row)
        for kind, result in measured.items():
            if "seconds" in result:
                extra = "".join(
                    f"  x{result[k]:.2f} {k.replace('over_', 'of ')}"
                    for k in ("over_inference", "over_inference_with_grad")
                    if k in result
                )
                if "above_output_arrays_bytes" in result:
                    extra += (
                        f"  {result['above_output_arrays_bytes'] / 2**30:+.2f} GiB above the "
                        f"output arrays (a window group: "
                        f"{result['window_group_bytes'] / 2**30:.2f} GiB)"
                    )
                print(
                    f"{'x'.join(map(str, size)):12s} {kind:18s} {result['seconds']:8.1f} s  "
                    f"peak +{result['peak_growth_bytes'] / 2**30:6.2f} GiB{extra}",
                    flush=True,
                )
            else:
                print(f"{'x'.join(map(str, size)):12s} {kind:18s} {result}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    import torch

    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "roi": ROI,
        "layer": LAYER,
        "rows": rows,
    }
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    (RESULTS / f"sliding{suffix}.json").write_text(json.dumps(result, indent=1))
    plot(rows, RESULTS / f"scaling{suffix}.png")
    print(f"written {RESULTS / f'sliding{suffix}.json'} and scaling{suffix}.png")


def plot(rows, path):
    """Time and peak memory growth against the voxel count, one line per run kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for kind in KINDS:
        points = [
            (math.prod(row["size"]), row[kind]) for row in rows if "seconds" in row.get(kind, {})
        ]
        if not points:
            continue
        voxels = [v / 1e6 for v, _ in points]
        axes[0].plot(voxels, [r["seconds"] for _, r in points], "-o", label=kind)
        axes[1].plot(voxels, [r["peak_growth_bytes"] / 2**30 for _, r in points], "-o", label=kind)
    axes[0].set(xlabel="voxels (millions)", ylabel="seconds", title="time")
    axes[1].set(xlabel="voxels (millions)", ylabel="peak growth (GiB)", title="peak memory")
    axes[0].legend(fontsize=8)
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
