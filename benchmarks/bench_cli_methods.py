"""The command line with 2 methods x 2 layers against 1 method x 1 layer, side by side.

    .venv/bin/python benchmarks/bench_cli_methods.py [--repeats 5]

The demo's 3D network on the demo CT volume (128^3, windowed, as .npy), target predicted:tumour,
layers: the last and the middle decoder block. ``segcam.apps.cli.main`` is called in this
process, so interpreter start-up and imports are excluded; everything else a user's run does is
included (building the model and loading its weights, reading the input, the passes, writing
NIfTI heatmaps, .npz maps and the manifest). Runs are interleaved (one warm-up each), medians of
``--repeats``. Also timed: the same two methods as two separate runs (what the command line
cost before methods shared their passes), and a folder of 4 such volumes with 2 x 2, each
input's files written on the writer thread while the next computes against each written before
the next starts (the writer replaced by an inline one). Writes
benchmarks/results/cli_methods.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from segcam.apps.cli import main as cli
from segcam.apps.demo import data
from segcam.apps.demo.models import DEMO_LAYERS, WEIGHTS_DIR

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["seg-grad-cam", "seg-hires-grad-cam"]
LAYERS = [DEMO_LAYERS["last decoder"], DEMO_LAYERS["middle decoder"]]


def command(volume: Path, out: Path, methods: list[str], layers: list[str]) -> list[str]:
    return [
        "explain",
        str(volume),
        "--model",
        "segcam.apps.demo.models:build_liver_model",
        "--model-kwargs",
        '{"which": "3d"}',
        "--weights",
        str(WEIGHTS_DIR / "liver_unet3d.pt"),
        "--classes",
        "background,liver,tumour",
        "--target",
        "predicted:tumour",
        *[part for layer in layers for part in ("--layer", layer)],
        *[part for method in methods for part in ("--method", method)],
        "--out",
        str(out),
        "--overwrite",
    ]


@contextmanager
def _writes_inline(inline: bool) -> Iterator[None]:
    """With ``inline``, the batch's writer thread replaced by running each write at once."""
    from concurrent.futures import Future

    from segcam.apps.batch import backends

    class Inline:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> Inline:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def submit(self, function, *arguments):
            future: Future = Future()
            try:
                future.set_result(function(*arguments))
            except Exception as error:
                future.set_exception(error)
            return future

    original = backends.ThreadPoolExecutor
    if inline:
        backends.ThreadPoolExecutor = Inline
    try:
        yield
    finally:
        backends.ThreadPoolExecutor = original


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    case = data.load_case()
    runs = {
        "1 method x 1 layer": [(METHODS[1:], LAYERS[:1])],
        "2 methods x 2 layers": [(METHODS, LAYERS)],
        "2 methods x 2 layers, one run per method (before)": [
            ([method], LAYERS) for method in METHODS
        ],
    }
    folders = {
        "4 volumes, 2 x 2, each written while the next computes": False,
        "4 volumes, 2 x 2, one after the other (written before the next)": True,
    }
    times: dict[str, list[float]] = {name: [] for name in [*runs, *folders]}
    with tempfile.TemporaryDirectory() as folder:
        volume = Path(folder) / "ct.npy"
        np.save(volume, data.window(case.image))
        volumes = Path(folder) / "volumes"
        volumes.mkdir()
        for k in range(4):
            np.save(volumes / f"ct{k}.npy", data.window(case.image))
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, calls in runs.items():
                started = time.perf_counter()
                for methods, layers in calls:
                    out = Path(folder) / name.replace(" ", "_")
                    assert cli(command(volume, out, methods, layers)) == 0
                if repeat:
                    times[name].append(time.perf_counter() - started)
            for name, inline in folders.items():
                out = Path(folder) / ("inline" if inline else "behind")
                started = time.perf_counter()
                with _writes_inline(inline):
                    assert cli([*command(volumes, out, METHODS, LAYERS), "--quiet"]) == 0
                if repeat:
                    times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["1 method x 1 layer"]
    print(f"demo 3D UNet, 128^3 CT, 1 target; medians of {args.repeats}, interleaved")
    for name, median in medians.items():
        print(f"  {name:52s} {median:6.2f} s   {median / base:5.2f}x")
    ratio = medians["2 methods x 2 layers"] / base
    print(f"2 methods x 2 layers / 1 method x 1 layer = {ratio:.2f} (goal <= 1.2)")
    names = list(folders)
    behind = medians[names[0]] / medians[names[1]]
    print(f"4 volumes: written while the next computes / one after the other = {behind:.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_methods.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpu_count": torch.get_num_threads(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                },
                "seconds": times,
                "median_seconds": medians,
                "ratio_2x2_over_1x1": ratio,
                "ratio_write_behind_over_inline": behind,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
