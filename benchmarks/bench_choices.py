"""The measurements behind design choices that the code's docstrings name but do not quote.

    .venv/bin/python benchmarks/bench_choices.py [--repeats 7]

Each choice is measured side by side in one process, median of --repeats calls after a warm-up:

- predicted sets: channel comparisons vs torch's argmax over the class axis (segcam.pixel_sets);
- .npz members: deflate level 1 vs 6 for logits and maps, and what each compresses to
  (segcam.explanation);
- channels-last 3D convolutions (the viewer's fast forward): a Conv3d's input gradient on a
  channels-last vs a contiguous input;
- the gradient methods' channel sum: torch.linalg.vecdot vs einsum (segcam.methods.gradient).

Writes benchmarks/results/choices.json and prints one line per choice.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import zlib
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(function, repeats):
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def predicted_sets(repeats):
    from segcam.pixel_sets import predicted_as

    logits = torch.randn(1, 3, 128, 128, 128)
    compare = median_ms(lambda: predicted_as(logits, 1), repeats)
    argmax = median_ms(lambda: logits.argmax(dim=1) == 1, repeats)
    assert torch.equal(predicted_as(logits, 1), logits.argmax(dim=1) == 1)
    return {"shape": [1, 3, 128, 128, 128], "comparisons_ms": compare, "argmax_ms": argmax}


def npz_levels(repeats):
    torch.manual_seed(0)
    logits = torch.randn(3, 128, 128, 128).numpy().tobytes()
    # a CAM map is smooth and mostly zero after ReLU: a coarse map up-sampled, as explain does
    coarse = torch.relu(torch.randn(1, 2, 16, 16, 16))
    maps = torch.nn.functional.interpolate(coarse, size=(128,) * 3, mode="trilinear")
    maps = maps.numpy().tobytes()
    result = {}
    for name, data in (("logits", logits), ("maps", maps)):
        for level in (1, 6):
            ms = median_ms(lambda d=data, lv=level: zlib.compress(d, lv), max(3, repeats // 2))
            ratio = len(zlib.compress(data, level)) / len(data)
            result[f"{name}_level{level}"] = {"ms": ms, "size_ratio": ratio}
    return result


def channels_last_conv3d(repeats):
    """A Conv3d's forward and input gradient, plain and channels-last: few and many channels.

    The few-channel cases are what ``memory_format="auto"`` lays out (a network's last layers);
    the wide one shows why it leaves wide convolutions alone (a smaller gain, and coarser
    rounding: the error against float64 of either layout's input gradient).
    """
    torch.manual_seed(0)
    cases = {
        "3->16 at 128^3": (3, 16, 128),
        "4->4 at 96^3": (4, 4, 96),
        "32->32 at 64^3": (32, 32, 64),
    }
    result = {}
    for name, (cin, cout, size) in cases.items():
        conv = torch.nn.Conv3d(cin, cout, 3, padding=1)
        plain = torch.randn(1, cin, size, size, size, requires_grad=True)
        last = plain.detach().contiguous(memory_format=torch.channels_last_3d)
        last.requires_grad_(True)

        def grad_of(x, conv=conv):
            out = conv(x)
            return torch.autograd.grad(out, x, torch.ones_like(out))[0]

        def forward_of(x, conv=conv):
            with torch.no_grad():
                return conv(x)

        conv64, x64 = copy.deepcopy(conv).double(), plain.detach().double().requires_grad_(True)
        out64 = conv64(x64)
        reference = torch.autograd.grad(out64, x64, torch.ones_like(out64))[0]
        scale = float(reference.abs().max())
        result[name] = {
            "forward_contiguous_ms": median_ms(lambda p=plain: forward_of(p), repeats),
            "forward_channels_last_ms": median_ms(lambda c=last: forward_of(c), repeats),
            "contiguous_ms": median_ms(lambda p=plain: grad_of(p), repeats),
            "channels_last_ms": median_ms(lambda c=last: grad_of(c), repeats),
            "error_contiguous": float((grad_of(plain).double() - reference).abs().max()) / scale,
            "error_channels_last": float((grad_of(last).double() - reference).abs().max()) / scale,
        }
    return result


def channel_sum(repeats):
    weights = torch.randn(1, 64)
    activation = torch.randn(1, 64, 64, 64, 64)
    vecdot = median_ms(
        lambda: torch.linalg.vecdot(weights[:, :, None, None, None], activation, dim=1), repeats
    )
    einsum = median_ms(lambda: torch.einsum("nc,nc...->n...", weights, activation), repeats)
    gradient = torch.randn_like(activation)
    elementwise_vecdot = median_ms(
        lambda: torch.linalg.vecdot(gradient, activation, dim=1), repeats
    )
    elementwise_einsum = median_ms(
        lambda: torch.einsum("nc...,nc...->n...", gradient, activation), repeats
    )
    return {
        "weights_vecdot_ms": vecdot,
        "weights_einsum_ms": einsum,
        "elementwise_vecdot_ms": elementwise_vecdot,
        "elementwise_einsum_ms": elementwise_einsum,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "predicted_sets": predicted_sets(args.repeats),
        "npz_levels": npz_levels(args.repeats),
        "channels_last_conv3d": channels_last_conv3d(args.repeats),
        "channel_sum": channel_sum(args.repeats),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "choices.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
