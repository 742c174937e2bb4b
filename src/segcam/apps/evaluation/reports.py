"""Summaries and reports of evaluation records: bootstrap intervals, tables, plots.

Per-sample values are summarised by their mean and a 95% bootstrap interval (percentile method,
2000 resamples, seeded).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from segcam.errors import OptionError
from segcam.io.writing import atomic_write, make_dir

__all__ = [
    "Curve",
    "Record",
    "bootstrap_interval",
    "plot_curves",
    "plot_summary",
    "summarise",
    "write_outputs",
    "write_tables",
]

Record = dict[str, object]
Curve = dict[str, list[float]]


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
    make_dir(out)
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
    make_dir(path.parent)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_outputs(name: str, records: list[Record], out: Path) -> list[Path]:
    """Tables (CSV, markdown), bar charts and the raw per-sample records of one dataset."""
    if not records:
        raise OptionError(f"{name}: nothing to score (no sample had a class present and predicted)")
    rows = summarise(records)
    written = [*write_tables(rows, out, name), plot_summary(rows, out, name)]
    with atomic_write(out / f"{name}_records.json", "w") as stream:
        json.dump(records, stream)
    return [*written, out / f"{name}_records.json"]
