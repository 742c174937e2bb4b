"""The evaluation's benchmarks, and a user's folder of inputs scored against label maps.

The built-in benchmarks: known evidence, the CT held-out slices, cascading randomisation.

For every method x layer x target the maps are scored with :mod:`segcam.metrics`. All methods of
one run share each input's forward pass and its backward passes (:func:`segcam.explain_methods`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import segcam
from segcam.apps.demo.models import DEMO_LAYERS, load_demo_model
from segcam.apps.evaluation.reports import Curve, Record, plot_curves, write_outputs
from segcam.apps.specs import apply_intensity
from segcam.errors import InputFileError, OptionError
from segcam.io.files import read_input
from segcam.metrics import (
    deletion_insertion,
    energy_inside,
    pointing_game,
    relevance_rank_accuracy,
)
from segcam.testing.evidence import evidence_batch, evidence_scene

__all__ = [
    "BUILT_IN",
    "EVIDENCE_HELD_OUT_SEED",
    "evaluate_ct",
    "evaluate_evidence",
    "evaluate_folder",
    "evaluate_randomization",
    "evidence_accuracy",
    "run_evaluation",
    "score_against_truth",
]

EVIDENCE_HELD_OUT_SEED = 2_000_000
BUILT_IN = ("ct", "evidence", "randomisation")


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
    model = load_demo_model("evidence-2d")
    records: list[Record] = []
    for index, seed in enumerate(range(EVIDENCE_HELD_OUT_SEED, EVIDENCE_HELD_OUT_SEED + count)):
        scene = evidence_scene(seed)
        x = torch.from_numpy(scene.image)[None]
        targets = [
            segcam.Mask(scene.disk_class, scene.disk),
            segcam.Mask(scene.square_class, scene.square),
        ]
        explanations = segcam.explain_methods(model, x, targets, list(layers.values()), methods)
        for method, expl in explanations.items():
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
    explanations = segcam.explain_methods(model, images, targets, list(layers.values()), methods)
    for method, expl in explanations.items():
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
    from segcam.apps.demo import data as liver
    from segcam.apps.demo.models import load_liver_model

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

    model = load_demo_model("evidence-2d")
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


def run_evaluation(
    data: Sequence[str], methods: Sequence[str], out: Path, count: int = 100
) -> list[Path]:
    """Evaluate the built-in datasets (``evidence``, ``ct``, ``randomisation``) into ``out``."""
    written: list[Path] = []
    for name in data:
        if name == "evidence":
            records = evaluate_evidence(methods, DEMO_LAYERS, count)
        elif name == "randomisation":
            records = evaluate_randomization(methods, DEMO_LAYERS)
        elif name == "ct":
            curves: dict[tuple[str, str, str, str], Curve] = {}
            records = evaluate_ct(methods, DEMO_LAYERS, curves=curves)
            written.append(plot_curves(curves, out / "ct_curves.png"))
        else:
            raise OptionError(f"unknown dataset {name!r}: use evidence, ct or randomisation")
        written.extend(write_outputs(name, records, out))
    return written


def evaluate_folder(
    model: nn.Module,
    folder: Path,
    labels: Path,
    methods: Sequence[str],
    layers: Sequence[str],
    *,
    class_names: Sequence[str] = (),
    intensity: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Record]:
    """Score a user's folder of inputs against label maps of the same file names in ``labels``.

    Every class 1..max(label) present in an input's label map is a target (its predicted region);
    see :func:`score_against_truth` for the scores. ``intensity`` are the keyword arguments of
    :func:`segcam.apps.specs.apply_intensity`.
    """
    from segcam.apps.batch import expand_inputs

    records: list[Record] = []
    files = expand_inputs([folder])
    for index, path in enumerate(files, start=1):
        label_path = labels / path.name
        if not label_path.is_file():
            raise InputFileError(f"{path}: no label map {label_path}")
        image = apply_intensity(read_input(path).array, **dict(intensity or {}))
        truth = torch.from_numpy(read_input(label_path).array[0].round().astype(np.int64))
        classes = {
            (class_names[c] if c < len(class_names) else str(c)): c
            for c in range(1, int(truth.max()) + 1)
        }
        records += score_against_truth(
            model,
            torch.from_numpy(image)[None],
            truth[None],
            methods,
            {name: name for name in layers},
            classes,
            dataset=folder.name,
            sample_names=[path.name],
        )
        if progress is not None:
            progress(f"[{index}/{len(files)}] {path}")
    return records
