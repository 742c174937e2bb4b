"""Speed and peak memory of segcam vs the physical limit and vs peers, side by side in one run.

    .venv/bin/python benchmarks/bench_core.py [--quick] [--only NAME...] [--repeats 9]
                                              [--device cuda]

The limit: one forward with hooks, one torch.autograd.grad per target to the layers, the map in
one line (gradient recording on for the whole forward, as a user would write it). Each
(configuration, implementation) runs in a fresh subprocess, so peak memory (resident set growth,
CPU) is its own; time is the median of --repeats calls after warm-up. Also measures the
re-targeting Explainer: a new target's time over a full explain. Writes
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
    "unet2d-256-K19": {"dims": 2, "size": 256, "batch": 1, "targets": 19},
    "unet2d-256-K4-L3": {"dims": 2, "size": 256, "batch": 1, "targets": 4, "layers": 3},
    "unet2d-256-K4-B8": {"dims": 2, "size": 256, "batch": 8, "targets": 4},
    "unet3d-64-K1": {"dims": 3, "size": 64, "batch": 1, "targets": 1},
    "unet3d-96-K1": {"dims": 3, "size": 96, "batch": 1, "targets": 1},
    "unet3d-96-K3": {"dims": 3, "size": 96, "batch": 1, "targets": 3},
    "unet3d-128-K1": {"dims": 3, "size": 128, "batch": 1, "targets": 1},
    "unet3d-128-K3": {"dims": 3, "size": 128, "batch": 1, "targets": 3},
    "segresnet3d-64-K3": {"dims": 3, "size": 64, "batch": 1, "targets": 3, "net": "segresnet"},
    "segresnet3d-96-K3": {"dims": 3, "size": 96, "batch": 1, "targets": 3, "net": "segresnet"},
    "segresnet3d-128-K1": {"dims": 3, "size": 128, "batch": 1, "targets": 1, "net": "segresnet"},
}
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))  # set by --device
SUFFIX = "" if DEVICE.type == "cpu" else f"_{DEVICE.type}"
IMPLEMENTATIONS = [
    "limit",
    "segcam-hires",
    "segcam-grad",
    "pytorch-grad-cam",
    "pytorch-grad-cam-gradcam",
    "captum",
    "captum-gradcam",
    "monai-gradcam",
    "torchcam-gradcam",
]
# Which segcam method each peer is compared with.
PEER_OF = {
    "pytorch-grad-cam": "segcam-hires",
    "captum": "segcam-hires",
    "pytorch-grad-cam-gradcam": "segcam-grad",
    "captum-gradcam": "segcam-grad",
    "monai-gradcam": "segcam-grad",
    "torchcam-gradcam": "segcam-grad",
}
LAYER = "model.1.submodule"
THREE_LAYERS = [
    "model.1.submodule.1.submodule.1.submodule",
    "model.1.submodule.1.submodule.2",
    "model.1.submodule",
]


def layers_of(config):
    if config.get("net") == "segresnet":
        return ["up_layers.1"]
    return THREE_LAYERS if config.get("layers", 1) == 3 else [LAYER]


def build(config):
    from monai.networks.nets import SegResNet, UNet

    torch.manual_seed(0)
    dims, size = config["dims"], config["size"]
    if config.get("net") == "segresnet":
        model = SegResNet(dims, init_filters=16, in_channels=1, out_channels=4).eval()
    else:
        model = UNet(
            dims, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1
        ).eval()
    x = torch.randn(config["batch"], 1, *([size] * dims))
    masks = [
        (torch.rand(config["batch"], *([size] * dims)) > 0.5) for _ in range(config["targets"])
    ]
    classes = [k % 4 for k in range(config["targets"])]
    model, x = model.to(DEVICE), x.to(DEVICE)
    masks = [mask.to(DEVICE) for mask in masks]
    return model, x, list(zip(classes, masks, strict=True))


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def limit(model, x, targets, layers):
    store = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: store.setdefault(name, o)
        )
        for name in layers
    ]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    activations = [store[name] for name in layers]
    maps = []
    for k, (c, mask) in enumerate(targets):
        score = (logits[:, c] * mask).sum()
        gradients = torch.autograd.grad(score, activations, retain_graph=k < len(targets) - 1)
        maps.append([(g * a).sum(1).detach() for g, a in zip(gradients, activations, strict=True)])
    return maps


def limit_channels_last(model, x, targets, layers):
    # the limit as a user would write it channels-last: the model's weights and the input in
    # that layout (every convolution), the same loop
    layout = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    if not getattr(model, "_bench_channels_last", False):
        model.to(memory_format=layout)
        model._bench_channels_last = True
    return limit(model, x.contiguous(memory_format=layout), targets, layers)


def segcam_runner(method, memory_format="auto"):
    import segcam

    def run(model, x, targets, layers):
        return segcam.explain(
            model,
            x,
            [segcam.Mask(c, m) for c, m in targets],
            layers,
            method,
            relu=False,
            upsample=False,
            memory_format=memory_format,
        ).layer_maps

    return run


def pytorch_grad_cam(model, x, targets, layers, kind="HiResCAM"):
    # One call per target (its targets are one per sample); ReLU + min-max + resize are built in.
    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    if x.ndim != 4:
        raise NotImplementedError("SemanticSegmentationTarget indexes (K, H, W): 2D only")
    cam = getattr(pytorch_grad_cam, kind)(
        model=model, target_layers=[model.get_submodule(name) for name in layers]
    )
    return [
        cam(
            input_tensor=x,
            targets=[
                SemanticSegmentationTarget(c, m[n].float().numpy()) for n in range(x.shape[0])
            ],
        )
        for c, m in targets
    ]


def captum(model, x, targets, layers, kind="LayerGradientXActivation"):
    import captum.attr

    maps = []
    for c, mask in targets:  # one forward and backward per target (and per layer)

        def score(inputs, c=c, mask=mask):
            return (model(inputs)[:, c] * mask).flatten(1).sum(1)

        for name in layers:
            maps.append(getattr(captum.attr, kind)(score, model.get_submodule(name)).attribute(x))
    return maps


def monai_gradcam(model, x, targets, layers):
    # MONAI's GradCAM explains class indices of an (N, classes) output: wrap the model so that
    # each target's masked logit sum is one "class". One forward and backward per target and
    # per layer (a call hooks one layer).
    from monai.visualize import GradCAM

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            logits = self.net(inputs)
            return torch.stack([(logits[:, c] * m).flatten(1).sum(1) for c, m in targets], 1)

    wrapper = Scores().eval()
    return [
        GradCAM(wrapper, target_layers=f"net.{name}")(x, class_idx=t)
        for t in range(len(targets))
        for name in layers
    ]


def torchcam_gradcam(model, x, targets, layers):
    # torchcam 0.5: the user runs the forward with the extractor's hooks on, then asks per target
    # with one callable per sample; retain_graph keeps the forward for the next target.
    from torchcam.methods import GradCAM

    with GradCAM(
        model, target_layer=[model.get_submodule(n) for n in layers], input_shape=tuple(x.shape[1:])
    ) as extractor:
        scores = model(x)
        maps = []
        for k, (c, mask) in enumerate(targets):
            per_sample = [lambda s, n=n, c=c, m=mask: (s[c] * m[n]).sum() for n in range(len(x))]
            maps.append(
                extractor(scores=scores, targets=per_sample, retain_graph=k < len(targets) - 1)
            )
    return maps


RUNNERS = {
    "limit": lambda: limit,
    "limit-channels-last": lambda: limit_channels_last,
    "segcam-hires-contiguous": lambda: segcam_runner("seg-hires-grad-cam", "contiguous"),
    "segcam-hires": lambda: segcam_runner("seg-hires-grad-cam"),
    "segcam-grad": lambda: segcam_runner("seg-grad-cam"),
    "pytorch-grad-cam": lambda: pytorch_grad_cam,
    "pytorch-grad-cam-gradcam": lambda: lambda *a: pytorch_grad_cam(*a, kind="GradCAM"),
    "captum": lambda: captum,
    "captum-gradcam": lambda: lambda *a: captum(*a, kind="LayerGradCam"),
    "monai-gradcam": lambda: monai_gradcam,
    "torchcam-gradcam": lambda: torchcam_gradcam,
}


def child(config_name, implementation, repeats):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    config = CONFIGS[config_name]
    layers = layers_of(config)
    run = RUNNERS[implementation]()
    # Warm up code paths (lazy imports, kernels) on a small input, so that the peak resident set
    # measured after the baseline is the real input's working memory.
    run(*build({**config, "size": 32, "batch": 1}), layers)
    model, x, targets = build(config)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(model, x, targets, layers)  # warm-up at full size (allocator caches)
    times = []
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run(model, x, targets, layers)
        synchronize()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = (peak - baseline) / 1024
    if DEVICE.type == "cuda":  # the device's memory, not the host's
        extra = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
    print(json.dumps({"times": times, "peak_extra_mib": extra}))


def interleaved(config_name, repeats):
    """segcam and the limit timed alternately in one process: machine drift hits both alike."""
    config = CONFIGS[config_name]
    layers = layers_of(config)
    model, x, targets = build(config)
    # the channels-last limit on its own copy (its weights are converted in place)
    import copy

    converted = copy.deepcopy(model)
    names = ("limit", "limit-channels-last", "segcam-hires", "segcam-grad")
    names += ("segcam-hires-contiguous",)
    runners = {name: RUNNERS[name]() for name in names}
    models = {name: converted if name == "limit-channels-last" else model for name in names}
    for name, run in runners.items():
        run(models[name], x, targets, layers)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            synchronize()
            start = time.perf_counter()
            run(models[name], x, targets, layers)
            synchronize()
            times[name].append(time.perf_counter() - start)
    print(json.dumps({name: statistics.median(values) for name, values in times.items()}))


def measure_retarget(repeats=9):
    """Median time of Explainer.explain (new target, kept forward) over segcam.explain."""
    import segcam

    model, x, targets = build(CONFIGS["unet2d-256-K1"])
    target = segcam.Mask(*targets[0])
    ratios = {}
    for layer in ("model.1.submodule.1.submodule.1.submodule", "model.1.submodule", "model.2"):
        explainer = segcam.Explainer(model, layer, relu=False, upsample=False)
        explainer.forward(x)
        full, partial = [], []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            segcam.explain(model, x, target, layer, relu=False, upsample=False)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            explainer.explain(target)
            partial.append(time.perf_counter() - start)
        explainer.close()
        ratios[layer] = statistics.median(partial[1:]) / statistics.median(full[1:])
    return ratios


def plot(results, path):
    """Time and peak memory against the number of targets (UNet 2D 256^2), one line per library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"unet2d-256-K1": 1, "unet2d-256-K4": 4, "unet2d-256-K19": 19}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for implementation in IMPLEMENTATIONS:
        points = [
            (k, results[name][implementation])
            for name, k in series.items()
            if name in results and "median_s" in results[name].get(implementation, {})
        ]
        if not points:
            continue
        ks = [k for k, _ in points]
        style = "-o" if implementation.startswith(("segcam", "limit")) else "--s"
        axes[0].plot(ks, [e["median_s"] * 1e3 for _, e in points], style, label=implementation)
        axes[1].plot(ks, [e["peak_extra_mib"] for _, e in points], style, label=implementation)
    axes[0].set(xlabel="targets", ylabel="median time (ms)", title="time, UNet 2D 256^2")
    axes[1].set(xlabel="targets", ylabel="peak memory growth (MiB)", title="peak memory")
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (results beside the CPU's: core_cuda.json)"
    )
    parser.add_argument("--quick", action="store_true", help="first two configurations only")
    parser.add_argument("--only", nargs="+", help="configurations whose name contains these")
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=IMPLEMENTATIONS,
        help="which to run in fresh processes",
    )
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPLEMENTATION"))
    parser.add_argument("--interleaved", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleaved-only",
        action="store_true",
        help="only the in-process segcam/limit time ratios",
    )
    args = parser.parse_args()
    global DEVICE, SUFFIX
    os.environ["BENCH_DEVICE"] = args.device  # the children read it
    DEVICE = torch.device(args.device)
    SUFFIX = "" if DEVICE.type == "cpu" else f"_{DEVICE.type}"
    if args.child:
        child(*args.child, args.repeats)
        return
    if args.interleaved:
        interleaved(args.interleaved, args.repeats)
        return
    configs = list(CONFIGS)[:2] if args.quick else list(CONFIGS)
    if args.only:
        configs = [name for name in configs if any(part in name for part in args.only)]
    ratios = {}
    print("segcam / limit, timed alternately in one process per configuration:")
    for name in configs:
        process = subprocess.run(
            [sys.executable, __file__, "--interleaved", name, "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        medians = json.loads(process.stdout.strip().splitlines()[-1])
        ratios[name] = {key: medians[key] / medians["limit"] for key in medians}
        print(
            f"  {name:18s} seg-hires {ratios[name]['segcam-hires']:.2f}x, "
            f"seg-grad {ratios[name]['segcam-grad']:.2f}x, "
            f"seg-hires contiguous {ratios[name]['segcam-hires-contiguous']:.2f}x, "
            f"limit channels-last {ratios[name]['limit-channels-last']:.2f}x "
            f"(limit {medians['limit'] * 1e3:.0f} ms)",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"core_interleaved{SUFFIX}.json").write_text(json.dumps(ratios, indent=1))
    if args.interleaved_only:
        return
    results = {}
    for name in configs:
        results[name] = {}
        for implementation in args.implementations:
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
                print(f"{name:18s} {implementation:25s} n/a ({reason[:90]})", flush=True)
                continue
            times = json.loads(process.stdout.strip().splitlines()[-1])
            entry = {
                "median_s": statistics.median(times["times"]),
                "min_s": min(times["times"]),
                "max_s": max(times["times"]),
                "peak_extra_mib": times["peak_extra_mib"],
            }
            results[name][implementation] = entry
            print(
                f"{name:18s} {implementation:25s} median {entry['median_s'] * 1e3:8.1f} ms "
                f"[{entry['min_s'] * 1e3:.1f}, {entry['max_s'] * 1e3:.1f}]  "
                f"peak +{entry['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
    print("\nratios (median time; peak memory):")
    for name, row in results.items():
        ours, base = row.get("segcam-hires", {}), row.get("limit", {})
        if "median_s" not in ours or "median_s" not in base:
            continue
        line = [
            f"segcam/limit {ours['median_s'] / base['median_s']:.2f}x time, "
            f"{ours['peak_extra_mib'] / max(base['peak_extra_mib'], 1):.2f}x memory"
        ]
        for peer, mine in PEER_OF.items():
            if "median_s" in row.get(peer, {}) and "median_s" in row.get(mine, {}):
                line.append(f"{peer}/segcam {row[peer]['median_s'] / row[mine]['median_s']:.2f}x")
        print(f"  {name:18s} " + "; ".join(line), flush=True)
    retarget = measure_retarget()
    print(
        "\nre-target (Explainer, one new target) / full explain (one target), UNet 2D 256^2: "
        + ", ".join(f"{layer}: {ratio:.2f}" for layer, ratio in retarget.items())
    )
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / f"core{SUFFIX}.json"
    output.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                },
                "repeats": args.repeats,
                "interleaved_ratios": ratios,
                "results": results,
                "retarget_over_full_explain": retarget,
            },
            indent=1,
        )
    )
    plot(results, RESULTS / f"core{SUFFIX}.png")
    print(f"wrote {output} and {RESULTS / f'core{SUFFIX}.png'}")


if __name__ == "__main__":
    main()
