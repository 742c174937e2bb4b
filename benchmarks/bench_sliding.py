"""Sliding-window explanations: time and peak memory against sliding-window inference itself.

    .venv/bin/python benchmarks/bench_sliding.py [--sizes 256 512x512x200] [--quick]

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
- ``segcam predicted``: for ``Predicted(1)``: a pass without gradients for the prediction, then
  one with backward for the windows that meet the predicted region (here: all).

Both explanations use Seg-HiRes-Grad CAM at the last decoder block. Writes
benchmarks/results/sliding.json.
"""

from __future__ import annotations

import argparse
import json
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


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(size, kind):
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    import segcam

    torch.manual_seed(0)
    model = UNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1).eval()
    volume = torch.randn((1, 1, *size))
    mask = torch.zeros(size, dtype=torch.bool)  # the user's pixel set exists before the call
    mask[tuple(slice(s // 2 - 32, s // 2 + 32) for s in size)] = True
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
        expl = segcam.explain_sliding_window(
            model, volume, target, LAYER, ROI, overlap=0.25, mode="gaussian", upsample=False
        )
        info = dict(expl.info["sliding_window"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_growth_bytes": _rss_bytes() - base, **info}


def run(size, kind):
    command = [sys.executable, __file__, "--child", "x".join(map(str, size)), kind]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"failed": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["256", "512x512x200"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a 160^3 volume only")
    args = parser.parse_args()
    if args.child:
        size = tuple(int(v) for v in args.child[0].split("x"))
        print(json.dumps(child(size, args.child[1])), flush=True)
        return
    sizes = ["160"] if args.quick else args.sizes
    rows = []
    for text in sizes:
        parts = [int(v) for v in text.split("x")]
        size = tuple(parts * 3 if len(parts) == 1 else parts)
        measured = {
            kind: run(size, kind)
            for kind in ("inference", "inference+grad", "segcam box", "segcam predicted")
        }
        row = {"size": list(size), **measured}
        grad = measured["inference+grad"].get("seconds")
        for kind in ("segcam box", "segcam predicted"):
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
    (RESULTS / "sliding.json").write_text(json.dumps(result, indent=1))
    print(f"written {RESULTS / 'sliding.json'}")


if __name__ == "__main__":
    main()
