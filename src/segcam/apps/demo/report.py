"""``segcam demo``: explain the trained CT liver-tumour networks and write a self-contained report.

Writes into the output folder:

- ``report.html``: one page, images embedded, that opens offline. For held-out axial slices and
  both classes (liver, tumour): CT, ground truth, prediction, and Seg-Grad CAM beside
  Seg-HiRes-Grad CAM at three depths of the 2D network (bottleneck, a middle decoder block, the
  last decoder block), with colour bars; then the same for the 3D network on orthogonal slices
  through the volume.
- NIfTI files of the 3D case, all with one affine (1 mm isotropic: the source gives no spacing),
  so they open aligned in 3D Slicer or ITK-SNAP: ``ct.nii.gz`` (HU), ``labels.nii.gz``,
  ``prediction.nii.gz`` and one map per method and class at the last decoder block, named as
  every segcam map is (:mod:`segcam.apps.naming`: ``<method>__<layer>__t<i>-predicted-<class>``).
- ``maps_2d_<method>.npz`` and ``maps_3d_<method>.npz``: the maps as segcam explanations.
- With the ``[nnunet]`` extra, a section on the committed nnU-Net v2 model
  (:data:`~segcam.apps.demo.models.NNUNET_MODEL`, trained by ``scripts/train_nnunet.py``): the
  held-out slab as an nnU-Net case (``nnunet/heldout_0000.nii.gz``), nnU-Net's own segmentation
  of it (``nnunet/heldout.nii.gz``) and the exact whole-case maps in the case's geometry
  (``nnunet/<method>__<layer>__t<i>-predicted-<class>.nii.gz``), shown beside the segmentation.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcam
from segcam.apps.demo import data as liver
from segcam.apps.demo.models import DEMO_LAYERS, NNUNET_MODEL, held_out_dice, load_liver_model
from segcam.apps.naming import map_stem
from segcam.io.files import write_nifti
from segcam.io.writing import atomic_write, make_dir
from segcam.postprocess import normalize

__all__ = ["DEMO_SLICES", "run_demo"]

DEMO_SLICES = (58, 64, 70, 76)  # held-out axial slices (56..79), each with liver and tumour
METHODS = ("seg-grad-cam", "seg-hires-grad-cam")
METHOD_LABELS = {"seg-grad-cam": "Seg-Grad CAM", "seg-hires-grad-cam": "Seg-HiRes-Grad CAM"}
TARGETS = (segcam.Predicted(1), segcam.Predicted(2))


def _progress(step: int, total: int, message: str) -> None:
    print(f"[{step}/{total}] {message}", file=sys.stderr, flush=True)


FIGURE_DPI = 150
Row = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]


def _figure_png(rows: list[Row], layers: dict[str, str]) -> bytes:
    """One figure: a row per (title, CT, truth, prediction, pixel set, {column title: map}).

    Maps are shown ReLU'd, each divided by its own maximum on the shown cut (one colour bar per
    row says so); under each map's title that maximum, and where the map is positive on under
    1 % of the cut, that share: the rest of the signed map is negative or 0 (not drawn after
    ReLU). ``layers`` (readable name -> module) is written under the figure. Saved at
    :data:`FIGURE_DPI`, as a 256-colour PNG (a third of the bytes, no visible loss).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colours = ["black", "tab:red", "tab:green"]  # as the viewer: liver red, tumour green
    classes = ListedColormap(colours)
    columns = 3 + len(rows[0][5])
    figure, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(1.95 * columns + 1.0, 2.5 * len(rows) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for row, (title, ct, truth, prediction, pixel_set, maps) in enumerate(rows):
        panels = [
            (ct, "CT", "gray", None),
            (truth, "ground truth", classes, 2),
            (prediction, "prediction", classes, 2),
        ]
        for column, (data, name, cmap, vmax) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(data, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            axis.set_title(name, fontsize=9)
        axes[row, 0].set_ylabel(title, fontsize=9)
        shown = None
        for column, (name, heat) in enumerate(maps.items(), start=3):
            axis = axes[row, column]
            top = float(heat.max())
            positive = float((heat > 0).mean())
            axis.imshow(ct, cmap="gray")
            shown = axis.imshow(
                heat / top if top > 0 else heat, cmap="inferno", alpha=0.7, vmin=0, vmax=1
            )
            axis.contour(pixel_set, levels=[0.5], colors="cyan", linewidths=0.6)
            facts = f"max {top:.3g}" if top > 0 else "0 on this cut"
            if 0 < positive < 0.01:
                facts += f", > 0 on {100 * positive:.2g} %"
            axis.set_title(f"{name}\n{facts}", fontsize=8.5)
        assert shown is not None
        bar = figure.colorbar(shown, ax=axes[row, 3:], shrink=0.85, pad=0.01)
        bar.set_label("map / its max here", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.legend(
        handles=[
            Patch(color=colours[1], label="liver"),
            Patch(color=colours[2], label="tumour"),
            Line2D([], [], color="cyan", label="pixel set (the explained target)"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize=9,
        frameon=False,
        title="layers: " + " · ".join(f"{depth} = {module}" for depth, module in layers.items()),
        title_fontsize=8,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(figure)
    from PIL import Image

    quantised = io.BytesIO()
    Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(256).save(
        quantised, format="PNG", optimize=True, dpi=(FIGURE_DPI, FIGURE_DPI)
    )
    return quantised.getvalue()


def _column_title(method: str, depth: str) -> str:
    """A map column's title: the method and the layer's readable name (modules: the legend)."""
    return f"{METHOD_LABELS[method]}\n{depth}"


def _map_columns(explanations: dict[str, segcam.Explanation], index: Any) -> dict[str, np.ndarray]:
    columns = {}
    for depth, layer in DEMO_LAYERS.items():
        for method in METHODS:
            maps = explanations[method].layer_maps[layer]
            columns[_column_title(method, depth)] = maps[index].cpu().numpy()
    return columns


def _normalised(explanation: segcam.Explanation) -> segcam.Explanation:
    """The explanation with every map divided by its maximum (as ``normalize="max"``)."""
    layer_maps = {k: normalize(v, "max") for k, v in explanation.layer_maps.items()}
    return dataclasses.replace(explanation, layer_maps=layer_maps, normalize="max")


def _explain_both(model: torch.nn.Module, x: torch.Tensor, stem: Path) -> dict[str, Any]:
    """Both methods at the three depths, ReLU'd, not normalised (the figures give each maximum).

    Each is saved max-normalised as ``<stem>_<method>.npz``.
    """
    explanations = segcam.explain_methods(model, x, TARGETS, list(DEMO_LAYERS.values()), METHODS)
    for method, explanation in explanations.items():
        _normalised(explanation).save(stem.parent / f"{stem.name}_{method}.npz")
    return explanations


def _section_2d(case: liver.LiverCase, out: Path) -> tuple[list[bytes], dict[str, float]]:
    model = load_liver_model("2d")
    slices = list(DEMO_SLICES)
    x = torch.from_numpy(liver.axial_slices(liver.window(case.image), slices))[:, None]
    truth = liver.axial_slices(case.labels, slices)
    explanations = _explain_both(model, x, out / "maps_2d")
    prediction = explanations[METHODS[0]].logits.argmax(1).numpy()
    figures = []
    for n, z in enumerate(slices):
        rows = []
        for t, target in enumerate(TARGETS):
            name = liver.CLASS_NAMES[target.class_index]
            pixel_set = explanations[METHODS[0]].pixel_sets[n, t].numpy()
            columns = {k: v.T for k, v in _map_columns(explanations, (n, t)).items()}
            rows.append(
                (
                    f"axial slice {z}: predicted {name}",
                    x[n, 0].numpy().T,
                    truth[n].T,
                    prediction[n].T,
                    pixel_set.T,
                    columns,
                )
            )
        figures.append(_figure_png(rows, DEMO_LAYERS))
    return figures, held_out_dice(model, "2d", case)


def _section_3d(
    case: liver.LiverCase, out: Path
) -> tuple[list[bytes], dict[str, float], list[Path]]:
    model = load_liver_model("3d")
    volume_hu, labels = case.image, case.labels  # NIfTI voxel order as stored, axial axis last
    x = torch.from_numpy(liver.window(volume_hu))[None, None]
    explanations = _explain_both(model, x, out / "maps_3d")
    prediction = explanations[METHODS[0]].logits.argmax(1)[0].numpy()
    affine = case.affine
    written = [
        write_nifti(out / "ct.nii.gz", volume_hu, affine),
        write_nifti(out / "labels.nii.gz", labels.astype(np.float32), affine),
        write_nifti(out / "prediction.nii.gz", prediction.astype(np.float32), affine),
    ]
    last = DEMO_LAYERS["last decoder"]
    for t, target in enumerate(TARGETS):
        name = liver.CLASS_NAMES[target.class_index]
        for method in METHODS:
            heat = normalize(explanations[method].layer_maps[last][:, t : t + 1], "max")
            stem = map_stem(method, last, t, "predicted", name)
            written.append(
                write_nifti(
                    out / f"{stem}.nii.gz", heat[0, 0].numpy(), affine, description=f"segcam {stem}"
                )
            )
    # Cuts through the middle; the axial one in the held-out slab. Axial cuts are transposed,
    # the others rotated so that the head end (high axial index) is up.
    views = {
        "axial": ((slice(None), slice(None), 68), np.transpose),
        "coronal": ((slice(None), 64, slice(None)), np.rot90),
        "sagittal": ((64, slice(None), slice(None)), np.rot90),
    }
    figures = []
    for t, target in enumerate(TARGETS):
        name = liver.CLASS_NAMES[target.class_index]
        rows = []
        pixel_set = explanations[METHODS[0]].pixel_sets[0, t].numpy()
        for view, (where, turn) in views.items():

            def cut(array: np.ndarray, where: tuple[Any, ...] = where, turn: Any = turn) -> Any:
                return turn(array[where])

            columns = {key: cut(value) for key, value in _map_columns(explanations, (0, t)).items()}
            rows.append(
                (
                    f"3D {view}: predicted {name}",
                    cut(x[0, 0].numpy()),
                    cut(labels),
                    cut(prediction),
                    cut(pixel_set),
                    columns,
                )
            )
        figures.append(_figure_png(rows, DEMO_LAYERS))
    return figures, held_out_dice(model, "3d", case), written


# three depths of the nnU-Net model's PlainConvUNet (4 stages)
NNUNET_LAYERS = {
    "bottleneck": "encoder.stages.3",
    "middle decoder": "decoder.stages.1",
    "last decoder": "decoder.stages.2",
}


def nnunet_missing() -> str | None:
    """Why the nnU-Net section cannot run (None: it can), with how to change that."""
    import importlib.util

    if importlib.util.find_spec("nnunetv2") is None:
        return "nnunetv2 is not installed (pip install 'segcam[nnunet]' adds it)"
    if not NNUNET_MODEL.is_dir():
        return f"the demo nnU-Net model folder {NNUNET_MODEL} is missing (reinstall segcam)"
    return None


def nnunet_available() -> bool:
    """Whether the nnU-Net section can run: nnunetv2 installed and the model folder present."""
    return nnunet_missing() is None


def _section_nnunet(
    case: liver.LiverCase, out: Path
) -> tuple[list[bytes], dict[str, float], list[Path]]:
    """nnU-Net's own prediction of the held-out slab and its exact maps, in the case geometry."""
    import warnings

    from segcam import nnunet
    from segcam.apps.demo.nnunet_case import write_heldout_case
    from segcam.nnunet.files import write_map, write_segmentation

    folder = out / "nnunet"
    image_path, _ = write_heldout_case(case, folder)
    start, stop = liver.HELD_OUT_SLICES.start, liver.HELD_OUT_SLICES.stop
    slab = np.ascontiguousarray(case.image[:, :, start:stop].astype(np.float32).transpose(2, 1, 0))
    truth = case.labels[:, :, start:stop].transpose(2, 1, 0)
    model = nnunet.load(NNUNET_MODEL, folds=("all",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nnU-Net's notes on CPU devices
        explanations, prediction = nnunet.explain_and_predict(
            model, [image_path], TARGETS, list(NNUNET_LAYERS.values()), METHODS
        )
    read = nnunet.read_case(model, [image_path])
    writer = model.plans_manager.image_reader_writer_class()
    segmentation = prediction.segmentation
    written = [
        image_path,
        write_segmentation(folder / "heldout.nii.gz", segmentation, writer, read.properties),
    ]
    last = NNUNET_LAYERS["last decoder"]
    for t, target in enumerate(TARGETS):
        name = liver.CLASS_NAMES[target.class_index]
        for method in METHODS:
            heat = normalize(explanations[method].layer_maps[last][:, t : t + 1], "max")[
                0, 0
            ].numpy()
            path = folder / f"{map_stem(method, last, t, 'predicted', name)}.nii.gz"
            written.append(write_map(path, heat, "SimpleITKIO", read.properties))
    figures = [
        _figure_png(_nnunet_rows(explanations, z, start, slab, truth, segmentation), NNUNET_LAYERS)
        for z in (2, 8, 14, 20)  # held-out axial slices 58, 64, 70, 76
    ]
    dice = {liver.CLASS_NAMES[c]: _dice(segmentation == c, truth == c) for c in (1, 2)}
    return figures, dice, written


def _nnunet_rows(
    explanations: dict[str, segcam.Explanation],
    z: int,
    start: int,
    slab: np.ndarray,
    truth: np.ndarray,
    segmentation: np.ndarray,
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """One figure's rows (one per class) at axial slice ``z`` of the held-out slab."""
    rows = []
    for t, target in enumerate(TARGETS):
        name = liver.CLASS_NAMES[target.class_index]
        columns = {}
        for depth, layer in NNUNET_LAYERS.items():
            for method in METHODS:
                maps = explanations[method].layer_maps[layer]
                columns[_column_title(method, depth)] = maps[0, t, z].numpy()
        rows.append(
            (
                f"axial slice {start + z}: nnU-Net's {name}",
                liver.window(slab[z]),
                truth[z],
                segmentation[z],
                explanations[METHODS[0]].pixel_sets[0, t, z].numpy(),
                columns,
            )
        )
    return rows


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


Section = tuple[str, str, str, list[bytes]]  # title, introduction (HTML), Dice table, figures


def _html(sections: list[Section], seconds: float) -> str:
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>segcam: CT liver-tumour explanations</title>",
        "<style>body{font-family:sans-serif;max-width:1500px;margin:1em auto;padding:0 1em;"
        "color:#222}"
        "img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
        "table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
        "caption{text-align:left;font-weight:600;padding-bottom:2px}p{max-width:1100px}</style>",
        "</head><body>",
        "<h1>segcam demo: why did the network label these pixels liver or tumour?</h1>",
        "<p>Real abdominal CT (LiTS-derived case 117, from the PyPI package "
        "<code>liver-ct-segmentation-package</code> 1.6.0, MIT), window -200..300 HU. "
        "Networks trained by <code>scripts/train_liver.py</code> on axial slices 0-47 and "
        "88-127; the 2D rows show held-out slices (56-79), the 3D views cut through the whole "
        "volume (the axial cut at held-out slice 68). Targets: the predicted pixels "
        "of each class (cyan outline). Maps: ReLU, up-sampled to the CT grid, each divided by its "
        "own maximum (given under its title; one colour bar per row). Seg-Grad CAM weights each "
        "channel by its averaged gradient; Seg-HiRes-Grad CAM multiplies gradient and activation "
        "element-wise (Rheude et al., MELBA 2024).</p>",
        "<p>A map that looks empty is not broken: the raw maps are signed, and ReLU keeps only "
        "positive evidence. Where Seg-Grad CAM's channel weights, averaged over the whole grid, "
        "make the weighted sum negative almost everywhere, the map is positive on a few voxels "
        "only (the title then says on how many); <code>segcam view</code> shows the signed map "
        "on a diverging scale.</p>",
    ]
    for title, intro, dice, figures in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{intro}</p>{dice}")
        for png in figures:
            encoded = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>")
    parts.append(
        f"<p><small>Made by segcam {segcam.__version__} with torch {torch.__version__} "
        f"in {seconds:.0f} s.</small></p></body></html>"
    )
    return "\n".join(parts)


def _dice_table(dice: dict[str, float]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in dice)
    cells = "".join(f"<td>{value:.3f}</td>" for value in dice.values())
    return f"<table><caption>held-out Dice</caption><tr>{head}</tr><tr>{cells}</tr></table>"


def run_demo(out: Path, *, offline: bool = False) -> int:
    """Run the CT demo into ``out``; return the exit status.

    The demo CT is downloaded on first use (:func:`segcam.apps.demo.data.fetch`) unless
    ``offline``.
    """
    started = time.perf_counter()
    with_nnunet = nnunet_available()
    total = 5 if with_nnunet else 4
    _progress(1, total, "reading the CT volume")
    case = liver.load_case(offline=offline)
    make_dir(out)
    _progress(
        2,
        total,
        f"2D network: {len(DEMO_SLICES)} held-out slices x 2 classes x "
        f"{len(DEMO_LAYERS)} layers x {len(METHODS)} methods",
    )
    figures_2d, dice_2d = _section_2d(case, out)
    _progress(3, total, "3D network: the whole volume, 2 classes x 3 layers x 2 methods")
    figures_3d, dice_3d, written = _section_3d(case, out)
    sections: list[Section] = [
        (
            "2D network (axial slices)",
            "Held-out axial slices through the 2D network, one figure per slice.",
            _dice_table(dice_2d),
            figures_2d,
        ),
        (
            "3D network (orthogonal slices through the volume)",
            "The whole volume through the 3D network, cut axially (held-out slice 68), "
            "coronally and sagittally through its middle; one figure per class.",
            _dice_table(dice_3d),
            figures_3d,
        ),
    ]
    if with_nnunet:
        _progress(4, total, "nnU-Net model: the held-out slab as a case, 2 classes x 3 layers")
        figures_nn, dice_nn, written_nn = _section_nnunet(case, out)
        written.extend(written_nn)
        intro = (
            "An nnU-Net v2 model trained with nnU-Net's own planning, preprocessing and training "
            "(<code>scripts/train_nnunet.py</code>: slabs of the training slices as cases, a "
            "small plan, 10 epochs, fold <code>all</code>) predicts the held-out slab (slices "
            "56-79) as a case, with its sliding windows, mirroring and export. The maps explain "
            "that exact segmentation (the prediction column is nnU-Net's own): each is the "
            "gradient of the masked sum of nnU-Net's exported logits, in the case's geometry.</p>"
            "<p><b>The window seams of Seg-Grad CAM.</b> nnU-Net predicts the slab in overlapping "
            "windows (24 x 64 x 64 here, nine of them, each also mirrored). In every window "
            "Seg-Grad CAM weights the channels by that window's own averaged gradient, so two "
            "neighbouring windows weight the same channels differently and the blended map "
            "steps where one window's share gives way to the next: straight edges at the window "
            "borders. They belong to the method, not to a fault: the exact gradient is taken "
            "through the whole pipeline. Seg-HiRes-Grad CAM does not average, so it has no such "
            "seams; at the coarse bottleneck both methods show some window edges, since each "
            "window computes its activations from its own crop, zero-padded at its borders."
        )
        sections.append(
            (
                "nnU-Net v2 model (the held-out slab as a case)",
                intro,
                _dice_table(dice_nn),
                figures_nn,
            )
        )
    else:
        print(f"the nnU-Net section is left out: {nnunet_missing()}", file=sys.stderr, flush=True)
        sections.append(
            (
                "nnU-Net v2 model",
                "Not shown: install <code>segcam[nnunet]</code> for this section.",
                "",
                [],
            )
        )
    _progress(total, total, "writing report.html")
    report = out / "report.html"
    page = _html(sections, time.perf_counter() - started)
    with atomic_write(report, "w") as stream:
        stream.write(page)
    npz = sorted(out.glob("maps_*d_*.npz"))
    print(f"done in {time.perf_counter() - started:.0f}s; wrote:")
    for path in (report, *written, *npz):
        print(f"  {path}")
    return 0
