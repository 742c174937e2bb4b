"""Evaluation of explanations over datasets: the evidence benchmark and the CT demo.

For every method x layer x target the maps are scored with :mod:`segcam.metrics`, and per-sample
values are summarised by their mean and a 95% bootstrap interval (percentile method, 2000
resamples, seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from segcam.testing.evidence import evidence_batch, evidence_scene

__all__ = [
    "EVIDENCE_HELD_OUT_SEED",
    "EVIDENCE_LAYERS",
    "bootstrap_interval",
    "build_evidence_model",
    "evidence_accuracy",
    "load_evidence_model",
]

DATA = Path(__file__).resolve().parent / "data"
EVIDENCE_HELD_OUT_SEED = 2_000_000
EVIDENCE_LAYERS = {
    "bottleneck": "model.1.submodule.1.submodule.1.submodule",
    "middle decoder": "model.1.submodule.1.submodule.2",
    "last decoder": "model.1.submodule.2",
}


def build_evidence_model() -> nn.Module:
    """MONAI UNet, four levels (16..128 channels), 1 input channel, 3 classes."""
    from monai.networks.nets import UNet  # type: ignore[attr-defined]

    model: nn.Module = UNet(2, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    return model


def load_evidence_model() -> nn.Module:
    """The trained benchmark network, in eval mode."""
    model = build_evidence_model()
    state = torch.load(DATA / "evidence_unet2d.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def evidence_accuracy(model: nn.Module, count: int = 200) -> dict[str, float]:
    """Held-out pixel accuracy, and the share of cue disks and squares labelled right (majority)."""
    seeds = range(EVIDENCE_HELD_OUT_SEED, EVIDENCE_HELD_OUT_SEED + count)
    images, labels = evidence_batch(seeds)
    with torch.no_grad():
        prediction = torch.cat(
            [model(torch.from_numpy(images[i : i + 50])).argmax(1) for i in range(0, count, 50)]
        ).numpy()
    disks = squares = 0
    for n, seed in enumerate(seeds):
        scene = evidence_scene(seed)
        disks += int(
            np.bincount(prediction[n][scene.disk], minlength=3).argmax() == scene.disk_class
        )
        squares += int(
            np.bincount(prediction[n][scene.square], minlength=3).argmax() == scene.square_class
        )
    return {
        "pixel_accuracy": round(float((prediction == labels).mean()), 4),
        "cue_disk_class_accuracy": round(disks / count, 4),
        "textured_square_class_accuracy": round(squares / count, 4),
    }


def bootstrap_interval(
    values: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and the percentile bootstrap interval of the mean (NaN values dropped)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, values.size), replace=True).mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


# ------------------------------------------------------------------ running the benchmarks

import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import segcam  # noqa: E402
from segcam.metrics import (  # noqa: E402
    deletion_insertion,
    energy_inside,
    pointing_game,
    relevance_rank_accuracy,
)

Record = dict[str, object]


def _progress(done: int, total: int, what: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    print(
        f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
        end="",
        file=sys.stderr,
        flush=True,
    )
    if done == total:
        print(file=sys.stderr)


def evaluate_evidence(
    methods: Sequence[str], layers: dict[str, str], count: int = 100
) -> list[Record]:
    """Per held-out scene, method, layer and object: where the positive map mass lies.

    Targets are the ground-truth pixels of each object with its true class. ``evidence`` is the
    marker for the cue disk and the square itself for the textured square.
    """
    model = load_evidence_model()
    records: list[Record] = []
    for index, seed in enumerate(range(EVIDENCE_HELD_OUT_SEED, EVIDENCE_HELD_OUT_SEED + count)):
        scene = evidence_scene(seed)
        x = torch.from_numpy(scene.image)[None]
        targets = [
            segcam.Mask(scene.disk_class, scene.disk),
            segcam.Mask(scene.square_class, scene.square),
        ]
        for method in methods:
            expl = segcam.explain(model, x, targets, list(layers.values()), method)
            for depth, layer in layers.items():
                maps = expl.layer_maps[layer][0]
                for t, (kind, evidence, own) in enumerate(
                    [
                        ("cue disk", scene.marker, scene.disk),
                        ("textured square", scene.square, scene.square),
                    ]
                ):
                    heat = maps[t : t + 1]
                    records.append(
                        {
                            "dataset": "evidence",
                            "sample": seed,
                            "method": method,
                            "layer": depth,
                            "target": kind,
                            "energy on evidence": float(
                                energy_inside(heat, torch.from_numpy(evidence))
                            ),
                            "energy on object": float(energy_inside(heat, torch.from_numpy(own))),
                            "pointing game on evidence": float(
                                pointing_game(heat, torch.from_numpy(evidence))
                            ),
                            # what a uniform map would score: the evidence's share of the image
                            "evidence area share (chance)": float(evidence.mean()),
                        }
                    )
        _progress(index + 1, count, "evidence benchmark")
    return records


Curve = dict[str, list[float]]


def score_against_truth(
    model: nn.Module,
    images: torch.Tensor,
    truth: torch.Tensor,
    methods: Sequence[str],
    layers: dict[str, str],
    classes: dict[str, int],
    *,
    dataset: str,
    sample_names: Sequence[object],
    steps: int = 16,
    curves: dict[tuple[str, str, str, str], Curve] | None = None,
) -> list[Record]:
    """Score maps of each class's predicted region against the ground truth ``truth`` (N, *S).

    Per sample, method, layer and class (samples where the class is neither present nor
    predicted are left out): energy in the ground truth, pointing game, relevance rank accuracy,
    and deletion/insertion AUC of the target score divided by its unperturbed value.
    """
    records: list[Record] = []
    targets = [segcam.Predicted(c) for c in classes.values()]
    for method in methods:
        expl = segcam.explain(model, images, targets, list(layers.values()), method)
        for depth, layer in layers.items():
            for t, (name, c) in enumerate(classes.items()):
                maps = expl.layer_maps[layer][:, t]
                present = (truth == c).flatten(1).any(1) & expl.pixel_sets[:, t].flatten(1).any(1)
                keep = present.nonzero().flatten()
                if keep.numel() == 0:
                    continue
                region = (truth == c)[keep]
                heat = maps[keep]
                deletion = deletion_insertion(model, images[keep], heat, targets[t], steps=steps)
                insertion = deletion_insertion(
                    model, images[keep], heat, targets[t], mode="insertion", steps=steps
                )
                start = deletion.scores[:, :1].clamp_min(1e-6)
                if curves is not None:
                    for mode, result in (("deletion", deletion), ("insertion", insertion)):
                        curves[(name, depth, method, mode)] = {
                            "fractions": result.fractions.tolist(),
                            "scores": (result.scores / start).mean(dim=0).tolist(),
                        }
                deletion_auc = torch.trapezoid(deletion.scores / start, deletion.fractions, dim=1)
                insertion_auc = torch.trapezoid(
                    insertion.scores / start, insertion.fractions, dim=1
                )
                energy = energy_inside(heat, region)
                pointing = pointing_game(heat, region)
                rank = relevance_rank_accuracy(heat, region)
                for row, n in enumerate(keep.tolist()):
                    records.append(
                        {
                            "dataset": dataset,
                            "sample": sample_names[n],
                            "method": method,
                            "layer": depth,
                            "target": name,
                            "energy in ground truth": float(energy[row]),
                            "pointing game": float(pointing[row]),
                            "relevance rank accuracy": float(rank[row]),
                            "deletion AUC": float(deletion_auc[row]),
                            "insertion AUC": float(insertion_auc[row]),
                        }
                    )
    return records


def evaluate_ct(
    methods: Sequence[str],
    layers: dict[str, str],
    steps: int = 16,
    curves: dict[tuple[str, str, str, str], Curve] | None = None,
) -> list[Record]:
    """The CT held-out slices (56..79) with the 2D network; see :func:`score_against_truth`."""
    from segcam import liver
    from segcam.demo_liver import load_liver_model

    case = liver.load_case()
    slices = list(liver.HELD_OUT_SLICES)
    images = torch.from_numpy(liver.axial_slices(liver.window(case.image), slices))[:, None]
    truth = torch.from_numpy(liver.axial_slices(case.labels, slices))
    print("scoring the CT held-out slices ...", file=sys.stderr, flush=True)
    return score_against_truth(
        load_liver_model("2d"),
        images,
        truth,
        methods,
        layers,
        {"liver": 1, "tumour": 2},
        dataset="ct",
        sample_names=slices,
        steps=steps,
        curves=curves,
    )


def evaluate_randomization(
    methods: Sequence[str], layers: dict[str, str], count: int = 8
) -> list[Record]:
    """Cascading randomisation on the evidence network.

    Spearman correlation of the original and the randomised maps (ReLU off, layer resolution)
    after half and after all of the layers with parameters are randomised from the output
    backwards.
    """
    from segcam.metrics import cascading_randomization

    model = load_evidence_model()
    seeds = range(EVIDENCE_HELD_OUT_SEED, EVIDENCE_HELD_OUT_SEED + count)
    scenes = [evidence_scene(seed) for seed in seeds]
    x = torch.from_numpy(np.stack([s.image for s in scenes]))
    square = np.stack([s.square for s in scenes])
    records: list[Record] = []
    for method in methods:
        for depth, layer in layers.items():

            def maps(net: nn.Module, layer: str = layer, method: str = method) -> torch.Tensor:
                # class 1 over each scene's square: a per-sample pixel set of one class
                return segcam.explain(
                    net, x, segcam.Mask(1, square), layer, method, relu=False, upsample=False
                ).maps

            steps = cascading_randomization(model, x, maps, seed=0)
            middle = steps[len(steps) // 2 - 1][1]
            final = steps[-1][1]
            for n, seed in enumerate(seeds):
                records.append(
                    {
                        "dataset": "randomisation",
                        "sample": seed,
                        "method": method,
                        "layer": depth,
                        "target": "square (class 1)",
                        "Spearman, half randomised": float(middle[n]),
                        "Spearman, all randomised": float(final[n]),
                    }
                )
    return records


METRIC_KEYS = ("dataset", "sample", "method", "layer", "target")


def summarise(records: list[Record]) -> list[Record]:
    """Mean and 95% bootstrap interval per dataset x target x method x layer x metric."""
    groups: dict[tuple[object, ...], list[Record]] = {}
    for record in records:
        key = (record["dataset"], record["target"], record["method"], record["layer"])
        groups.setdefault(key, []).append(record)
    rows: list[Record] = []
    for (dataset, target, method, layer), members in groups.items():
        metrics = [k for k in members[0] if k not in METRIC_KEYS]
        for metric in metrics:
            values = np.array([float(m[metric]) for m in members])  # type: ignore[arg-type]
            mean, low, high = bootstrap_interval(values)
            rows.append(
                {
                    "dataset": dataset,
                    "target": target,
                    "method": method,
                    "layer": layer,
                    "metric": metric,
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "n": int((~np.isnan(values)).sum()),
                }
            )
    return rows


def write_tables(rows: list[Record], out: Path, stem: str) -> tuple[Path, Path]:
    """Write the summary as CSV and as a markdown table (one row per target x metric x layer)."""
    from segcam.io.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with atomic_write(csv_path, "w") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    lines = [
        "| target | metric | layer | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    index = {(r["target"], r["metric"], r["layer"], r["method"]): r for r in rows}
    for target, metric, layer in dict.fromkeys(
        (r["target"], r["metric"], r["layer"]) for r in rows
    ):
        cells = []
        for method in methods:
            row = index.get((target, metric, layer, method))
            cells.append(
                "" if row is None else f"{row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"
            )
        lines.append(f"| {target} | {metric} | {layer} | " + " | ".join(cells) + " |")
    with atomic_write(md_path, "w") as stream:
        stream.write("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_summary(rows: list[Record], out: Path, stem: str) -> Path:
    """Bar charts (mean with 95% interval) per target x metric, methods side by side per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((str(r["target"]), str(r["metric"])) for r in rows))
    layers = list(dict.fromkeys(str(r["layer"]) for r in rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    columns = 3
    figure_rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(
        figure_rows,
        columns,
        figsize=(4.2 * columns, 3.0 * figure_rows),
        squeeze=False,
        layout="constrained",
    )
    width = 0.8 / len(methods)
    for axis, (target, metric) in zip(axes.flat, panels, strict=False):
        for m, method in enumerate(methods):
            means: list[float] = []
            errors: list[list[float]] = [[], []]
            for layer in layers:
                row = next(
                    r
                    for r in rows
                    if (r["target"], r["metric"], r["layer"], r["method"])
                    == (target, metric, layer, method)
                )
                mean, low, high = (float(row[k]) for k in ("mean", "low", "high"))  # type: ignore[arg-type]
                means.append(mean)
                errors[0].append(mean - low)
                errors[1].append(high - mean)
            axis.bar(
                np.arange(len(layers)) + m * width,
                means,
                width,
                yerr=errors,
                capsize=2,
                label=method,
            )
        axis.set_xticks(np.arange(len(layers)) + width * (len(methods) - 1) / 2, layers, fontsize=7)
        axis.set_title(f"{target}: {metric}", fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    path = out / f"{stem}.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_curves(curves: dict[tuple[str, str, str, str], Curve], path: Path) -> Path:
    """Mean deletion and insertion curves: a panel per class x mode, a line per method x layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(key[0] for key in curves))
    modes = ["deletion", "insertion"]
    figure, axes = plt.subplots(
        len(classes), 2, figsize=(10, 3.2 * len(classes)), squeeze=False, layout="constrained"
    )
    styles = {"bottleneck": ":", "middle decoder": "--", "last decoder": "-"}
    for (name, depth, method, mode), curve in curves.items():
        axis = axes[classes.index(name), modes.index(mode)]
        colour = "tab:blue" if method == "seg-hires-grad-cam" else "tab:orange"
        axis.plot(
            curve["fractions"],
            curve["scores"],
            styles.get(depth, "-"),
            color=colour,
            label=f"{method}, {depth}",
        )
        axis.set_title(f"{name}: {mode} (score / unperturbed score)", fontsize=9)
        axis.set_xlabel("fraction of pixels changed, highest map values first", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_outputs(name: str, records: list[Record], out: Path) -> list[Path]:
    """Tables (CSV, markdown), bar charts and the raw per-sample records of one dataset."""
    from segcam.io.files import atomic_write

    if not records:
        raise ValueError(f"{name}: nothing to score (no sample had a class present and predicted)")
    rows = summarise(records)
    written = [*write_tables(rows, out, name), plot_summary(rows, out, name)]
    with atomic_write(out / f"{name}_records.json", "w") as stream:
        json.dump(records, stream)
    return [*written, out / f"{name}_records.json"]


def run_evaluation(
    data: Sequence[str], methods: Sequence[str], out: Path, count: int = 100
) -> list[Path]:
    """Evaluate the built-in datasets (``evidence``, ``ct``, ``randomisation``) into ``out``."""
    from segcam.demo_liver import LIVER_LAYERS

    written: list[Path] = []
    for name in data:
        if name == "evidence":
            records = evaluate_evidence(methods, EVIDENCE_LAYERS, count)
        elif name == "randomisation":
            records = evaluate_randomization(methods, EVIDENCE_LAYERS)
        elif name == "ct":
            curves: dict[tuple[str, str, str, str], Curve] = {}
            records = evaluate_ct(methods, LIVER_LAYERS, curves=curves)
            written.append(plot_curves(curves, out / "ct_curves.png"))
        else:
            raise ValueError(f"unknown dataset {name!r}: use evidence, ct or randomisation")
        written.extend(write_outputs(name, records, out))
    return written
