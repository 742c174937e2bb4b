"""The further methods (issue 6) against pytorch-grad-cam, side by side in one run.

    .venv/bin/python benchmarks/bench_methods.py [--repeats 7] [--quick]

For each method with a pytorch-grad-cam counterpart (Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM,
Eigen-CAM) on a MONAI UNet (2D, 128 x 128, decoder layer with 16 channels at 64 x 64), with 1 and
3 targets: the median time of segcam and of the peer, measured interleaved (segcam, peer,
segcam, ...) in this process so that both see the same machine state, and the largest
difference of their maps after the same post-processing (ReLU, up-sampling, min-max). The peer
needs one call per target (its targets are one per sample); segcam takes one forward for all
targets (and, for Score-CAM, one set of masked forwards for all targets). Also segcam's cost
of every registered method relative to Seg-HiRes-Grad CAM in 2D and 3D (UNet 3D, 64^3).
Writes benchmarks/results/methods.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import segcam

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = "model.1.submodule"
FULL = "model.2.0"  # a layer at the input's resolution
PEERS = {
    "seg-grad-cam++": "GradCAMPlusPlus",
    "seg-xgrad-cam": "XGradCAM",
    "seg-layer-cam": "LayerCAM",
    "seg-score-cam": "ScoreCAM",
    "seg-eigen-cam": "EigenCAM",
}
# Why two maps may differ although both follow the same paper.
NOTES = {
    "seg-grad-cam++": "theirs adds 1e-6 to the denominator of a (tiny gradients); the weights "
    "agree to 1e-5 where gradients are of order 1 (tests/test_more_methods.py)",
    "seg-score-cam": "theirs up-samples the channel masks with align_corners=True, segcam with "
    "half-pixel centres; at a full-resolution layer they agree to 1e-4 (tests)",
    "seg-eigen-cam": "compared with the sign that matches (PCA leaves it open)",
}


def build(dims, size, targets, seed=0):
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    model = UNet(dims, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, *([size] * dims)), generator=generator)
    masks = []
    for k in range(targets):  # boxes: pixel sets of a few hundred pixels keep Score-CAM soft
        mask = torch.zeros((1, *([size] * dims)), dtype=torch.bool)
        start = 8 + 16 * k
        mask[(0, *([slice(start, start + 12)] * dims))] = True
        masks.append((k % 4, mask))
    return model, x, masks


def import_peer():
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    import pytorch_grad_cam

    return pytorch_grad_cam, library


def run_segcam(method, model, x, targets, layer=LAYER):
    expl = segcam.explain(
        model, x, [segcam.Mask(c, m) for c, m in targets], layer, method, normalize="minmax"
    )
    return expl.maps[0].numpy()


def run_peer(module, kind, model, x, targets, layer=LAYER):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    cam = getattr(module, kind)(model=model, target_layers=[model.get_submodule(layer)])
    cam.batch_size = 32  # as segcam's default for Score-CAM
    with contextlib.redirect_stderr(io.StringIO()):  # its Score-CAM's progress bars
        maps = [
            cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, m[0].float().numpy())])[0]
            for c, m in targets
        ]
    return np.stack(maps)


def flipped_eigen(model, x, targets):
    """segcam's Eigen-CAM maps with the other sign, post-processed as the peer does."""
    from segcam.postprocess import normalize, relu, upsample

    raw = segcam.explain(
        model,
        x,
        [segcam.Mask(c, m) for c, m in targets],
        LAYER,
        "seg-eigen-cam",
        relu=False,
        upsample=False,
    ).maps
    return normalize(upsample(relu(-raw), x.shape[2:]), "minmax")[0].numpy()


def timed(function, *args):
    """Seconds of one call."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def compare(repeats, target_counts):
    module, _library = import_peer()
    rows = []
    for count in target_counts:
        model, x, targets = build(2, 128, count)
        for method, kind in PEERS.items():
            ours = run_segcam(method, model, x, targets)
            theirs = run_peer(module, kind, model, x, targets)
            gaps = np.abs(ours - theirs).reshape(len(targets), -1).max(axis=1)
            if method == "seg-eigen-cam":  # PCA leaves the sign open: segcam fixes it, theirs not
                other = np.abs(flipped_eigen(model, x, targets) - theirs)
                gaps = np.minimum(gaps, other.reshape(len(targets), -1).max(axis=1))
            difference = float(gaps.max())
            full = None
            if method == "seg-score-cam":  # at full resolution no mask is up-sampled
                full = float(
                    np.abs(
                        run_segcam(method, model, x, targets, FULL)
                        - run_peer(module, kind, model, x, targets, FULL)
                    ).max()
                )
            ours_times, peer_times = [], []
            for _ in range(repeats):  # interleaved
                ours_times.append(timed(run_segcam, method, model, x, targets))
                peer_times.append(timed(run_peer, module, kind, model, x, targets))
            row = {
                "config": f"unet2d-128-K{count}",
                "method": method,
                "peer": f"pytorch-grad-cam {kind}",
                "segcam_s": statistics.median(ours_times),
                "peer_s": statistics.median(peer_times),
                "max_map_difference": difference,
                "note": NOTES.get(method, ""),
            }
            if full is not None:
                row["max_map_difference_at_" + FULL] = full
            row["peer_over_segcam"] = row["peer_s"] / row["segcam_s"]
            rows.append(row)
            print(
                f"{row['config']:16s} {method:16s} segcam {row['segcam_s'] * 1e3:8.1f} ms  "
                f"{kind:16s} {row['peer_s'] * 1e3:8.1f} ms  peer/segcam "
                f"{row['peer_over_segcam']:5.2f}  max |diff| {difference:.1e}"
                + (f" ({full:.1e} at {FULL})" if full is not None else ""),
                flush=True,
            )
    return rows


def method_costs(repeats, quick):
    rows = []
    configs = [(2, 128)] if quick else [(2, 128), (3, 64)]
    for dims, size in configs:
        model, x, targets = build(dims, size, 3)
        base = None
        for method in segcam.list_methods():
            seconds = statistics.median(
                timed(run_segcam, method, model, x, targets) for _ in range(repeats)
            )
            base = seconds if method == "seg-hires-grad-cam" else base
            row = {
                "config": f"unet{dims}d-{size}-K3",
                "method": method,
                "seconds": seconds,
                "over_hires": seconds / base,
            }
            rows.append(row)
            print(
                f"{row['config']:16s} {method:20s} {seconds * 1e3:9.1f} ms  "
                f"x{row['over_hires']:6.2f} of seg-hires-grad-cam",
                flush=True,
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="K=1 only, 2D costs only, 3 repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(max(1, torch.get_num_threads()))
    peers = compare(repeats, [1] if args.quick else [1, 3])
    costs = method_costs(repeats, args.quick)
    RESULTS.mkdir(exist_ok=True)
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "repeats": repeats,
        "peers": peers,
        "costs": costs,
    }
    (RESULTS / "methods.json").write_text(json.dumps(result, indent=1))
    print(f"written {RESULTS / 'methods.json'}")


if __name__ == "__main__":
    main()
