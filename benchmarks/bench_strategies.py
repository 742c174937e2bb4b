"""How to take T gradients to a layer from one forward: measured, not guessed.

    .venv/bin/python benchmarks/bench_strategies.py

- loop: one torch.autograd.grad(retain_graph=True) per target (what segcam does);
- batched: one torch.autograd.grad(..., is_grads_batched=True) with the T grad_outputs stacked;
- vmap-vjp: torch.func.vjp of "layer activation -> logits" (the layer's output replaced by a
  hook), then torch.func.vmap over the T cotangents.
Each runs the forward too; all three give the same gradients (checked). Median of 7 runs after a
warm-up, in one process, interleaved. Writes benchmarks/results/strategies.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from monai.networks.nets import UNet

LAYER = "model.1.submodule"
CONFIGS = {
    "2D 256^2, T=4": (2, 256, 4),
    "2D 256^2, T=19": (2, 256, 19),
    "3D 64^3, T=3": (3, 64, 3),
}


def setup(dims, size, targets):
    torch.manual_seed(0)
    model = UNet(dims, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1).eval()
    x = torch.randn(1, 1, *([size] * dims))
    masks = torch.rand(targets, 1, *([size] * dims)) > 0.5
    return model, x, masks


def grad_outputs(logits, masks):
    stacked = torch.zeros(masks.shape[0], *logits.shape)
    for t in range(masks.shape[0]):
        stacked[t, :, t % logits.shape[1]] = masks[t].float()
    return stacked


def forward(model, x):
    store = {}
    module = model.get_submodule(LAYER)
    handle = module.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, store["a"]


def loop(model, x, masks):
    logits, activation = forward(model, x)
    cotangents = grad_outputs(logits.detach(), masks)
    return torch.stack(
        [
            torch.autograd.grad(logits, activation, cotangents[t], retain_graph=t < len(masks) - 1)[
                0
            ]
            for t in range(len(masks))
        ]
    )


def batched(model, x, masks):
    logits, activation = forward(model, x)
    cotangents = grad_outputs(logits.detach(), masks)
    return torch.autograd.grad(logits, activation, cotangents, is_grads_batched=True)[0]


def vmap_vjp(model, x, masks):
    module = model.get_submodule(LAYER)
    with torch.no_grad():
        _, activation = forward(model, x)

    def downstream(replacement):
        handle = module.register_forward_hook(lambda m, i, o: replacement)
        try:
            return model(x)
        finally:
            handle.remove()

    logits, vjp = torch.func.vjp(downstream, activation)
    cotangents = grad_outputs(logits.detach(), masks)
    return torch.func.vmap(vjp)(cotangents)[0]


STRATEGIES = {"loop": loop, "batched": batched, "vmap-vjp": vmap_vjp}


def main():
    results = {}
    for name, config in CONFIGS.items():
        model, x, masks = setup(*config)
        reference = loop(model, x, masks)
        times = {strategy: [] for strategy in STRATEGIES}
        for strategy, function in STRATEGIES.items():
            try:
                torch.testing.assert_close(
                    function(model, x, masks), reference, rtol=1e-4, atol=1e-5
                )
            except Exception as error:  # report, do not hide
                times[strategy] = None
                print(f"{name}: {strategy} failed: {type(error).__name__}: {error}"[:200])
        for _ in range(7):
            for strategy, function in STRATEGIES.items():
                if times[strategy] is None:
                    continue
                start = time.perf_counter()
                function(model, x, masks)
                times[strategy].append(time.perf_counter() - start)
        medians = {s: statistics.median(t) for s, t in times.items() if t}
        results[name] = medians
        print(
            name
            + ": "
            + ", ".join(
                f"{s} {m * 1e3:.0f} ms ({m / medians['loop']:.2f}x loop)"
                for s, m in medians.items()
            ),
            flush=True,
        )
    output = Path(__file__).resolve().parent / "results" / "strategies.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({"torch": torch.__version__, "median_s": results}, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
