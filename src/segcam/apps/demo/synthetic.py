"""A quick example: explain a small trained MONAI UNet on a held-out synthetic scene.

    python -m segcam.apps.demo.synthetic --out synthetic-out

The network (``synthetic-2d`` in :mod:`segcam.apps.demo.models`, trained by
``scripts/train_synthetic_unet.py``) segments disks (class 1) and squares (class 2). The demo
explains, for a scene it never saw in training, the predicted disks, the predicted squares and
the largest predicted disk alone, with Seg-Grad CAM and Seg-HiRes-Grad CAM at three depths of the
network, and writes a figure and the raw maps. Needs the ``[monai]`` and ``[viz]`` extras.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcam
from segcam.apps.demo.models import DEMO_LAYERS, DEMO_MODELS, load_demo_model
from segcam.io.writing import make_dir
from segcam.testing.synthetic import CLASS_NAMES, shapes_scene

__all__ = ["HELD_OUT_SEED", "main"]

HELD_OUT_SEED = 1_000_000


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise SystemExit(f"this example needs {module}: pip install 'segcam[{extra}]'") from error


def _figure(
    image: np.ndarray,
    labels: np.ndarray,
    explanations: dict[str, segcam.Explanation],
    titles: list[str],
    path: Path,
) -> None:
    matplotlib = _require("matplotlib", "viz")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    classes = ListedColormap(["black", "tab:orange", "tab:cyan"])
    first = next(iter(explanations.values()))
    prediction = first.logits.argmax(1)[0].cpu().numpy()
    rows, columns = len(titles), 3 + 2 * len(DEMO_LAYERS)
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False, layout="constrained"
    )
    shown = None
    for row, title in enumerate(titles):
        pixel_set = first.pixel_sets[0, row].cpu().numpy()
        panels = [
            (image[0], "input", "gray"),
            (labels, "ground truth", classes),
            (prediction, "prediction", classes),
        ]
        for column, (data, name, cmap) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(
                data,
                cmap=cmap,
                vmin=0 if cmap is classes else None,
                vmax=2 if cmap is classes else None,
                interpolation="nearest",
            )
            if column == 0:
                axis.contour(pixel_set, levels=[0.5], colors="yellow", linewidths=0.8)
                axis.set_ylabel(title, fontsize=8)
            axis.set_title(name, fontsize=8)
        for index, (depth, layer) in enumerate(DEMO_LAYERS.items()):
            for offset, method in enumerate(("seg-grad-cam", "seg-hires-grad-cam")):
                axis = axes[row, 3 + 2 * index + offset]
                heat = explanations[method].layer_maps[layer][0, row].cpu().numpy()
                axis.imshow(image[0], cmap="gray")
                shown = axis.imshow(heat, cmap="inferno", alpha=0.75, vmin=0, vmax=1)
                axis.contour(pixel_set, levels=[0.5], colors="cyan", linewidths=0.6)
                label = "Seg-Grad" if method == "seg-grad-cam" else "Seg-HiRes-Grad"
                axis.set_title(f"{label}\n{depth}", fontsize=7)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    assert shown is not None
    figure.colorbar(shown, ax=axes[:, 3:], location="right", shrink=0.8, label="map (max = 1)")
    figure.suptitle(
        "segcam demo: maps per pixel set (yellow/cyan outline), ReLU, up-sampled, max-normalised",
        fontsize=9,
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segcam.apps.demo.synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED + 8, help="held-out scene seed")
    args = parser.parse_args(argv)
    if args.seed < HELD_OUT_SEED:
        parser.error(f"--seed must be >= {HELD_OUT_SEED}: lower seeds were used for training")
    start = time.perf_counter()
    make_dir(args.out)
    print(
        f"[1/3] loading the trained UNet ({DEMO_MODELS['synthetic-2d'].weights}) and "
        f"held-out scene {args.seed}"
    )
    model = load_demo_model()
    image, labels = shapes_scene(args.seed)
    x = torch.from_numpy(image)[None]
    targets = [segcam.Predicted(1), segcam.Predicted(2), segcam.Region(1)]
    titles = [
        f"predicted {CLASS_NAMES[1]}s",
        f"predicted {CLASS_NAMES[2]}s",
        f"largest {CLASS_NAMES[1]}",
    ]
    print(f"[2/3] explaining {len(targets)} targets x {len(DEMO_LAYERS)} layers x 2 methods")
    explanations = segcam.explain_methods(
        model,
        x,
        targets,
        list(DEMO_LAYERS.values()),
        ["seg-grad-cam", "seg-hires-grad-cam"],
        normalize="max",
    )
    figure = args.out / "demo.png"
    print("[3/3] writing the figure and the maps")
    _figure(image, labels, explanations, titles, figure)
    saved = [
        explanation.save(args.out / f"{method}.npz") for method, explanation in explanations.items()
    ]
    prediction = explanations["seg-grad-cam"].logits.argmax(1)[0].numpy()
    accuracy = float((prediction == labels).mean())
    print(f"pixel accuracy on this held-out scene: {accuracy:.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s; wrote:")
    for path in (figure, *saved):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
