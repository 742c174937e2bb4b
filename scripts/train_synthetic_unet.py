"""Train the demo's small MONAI UNet on synthetic disks (class 1) and squares (class 2).

    .venv/bin/python scripts/train_synthetic_unet.py \
        --weights src/segcam/apps/demo/weights/synthetic_unet2d.pt \
        --log scripts/train_synthetic_unet.log.json

Fixed seeds throughout: training scenes use seeds 0..TRAIN_SCENES-1, held-out scenes use seeds
from 1_000_000 on (never trained on). Writes the weights (a state_dict of
tensors only, loadable with torch.load(weights_only=True)) and the log where the command line says.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from segcam.apps.demo.models import build_demo_model
from segcam.apps.demo.synthetic import HELD_OUT_SEED
from segcam.testing.synthetic import shapes_batch

TRAIN_SCENES, HELD_OUT_SCENES, STEPS, BATCH, SIZE = 2000, 200, 600, 16, 64


def dice_per_class(prediction: np.ndarray, labels: np.ndarray, classes: int) -> list[float]:
    scores = []
    for c in range(1, classes):
        p, g = prediction == c, labels == c
        scores.append(float(2 * (p & g).sum() / max(p.sum() + g.sum(), 1)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="where to write the weights")
    parser.add_argument("--log", type=Path, required=True, help="where to write the training log")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    images, labels = shapes_batch(range(TRAIN_SCENES), SIZE)
    held_images, held_labels = shapes_batch(
        range(HELD_OUT_SEED, HELD_OUT_SEED + HELD_OUT_SCENES), SIZE
    )
    model = build_demo_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, STEPS)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = np.random.default_rng(0)
    history = []
    start = time.time()
    model.train()
    for step in range(STEPS):
        index = order.integers(0, TRAIN_SCENES, size=BATCH)
        x, y = torch.from_numpy(images[index]), torch.from_numpy(labels[index])
        loss = loss_fn(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == STEPS - 1:
            history.append({"step": step, "loss": round(float(loss), 5)})
            print(f"step {step:4d}  loss {float(loss):.4f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        prediction = model(torch.from_numpy(held_images)).argmax(1).numpy()
    dice = dice_per_class(prediction, held_labels, 3)
    accuracy = float((prediction == held_labels).mean())
    print(f"held-out Dice: disk {dice[0]:.4f}, square {dice[1]:.4f}; pixel accuracy {accuracy:.4f}")
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, args.weights)
    args.log.write_text(
        json.dumps(
            {
                "steps": STEPS,
                "batch": BATCH,
                "size": SIZE,
                "train_seeds": [0, TRAIN_SCENES - 1],
                "held_out_seeds": [HELD_OUT_SEED, HELD_OUT_SEED + HELD_OUT_SCENES - 1],
                "held_out_dice": {"disk": round(dice[0], 4), "square": round(dice[1], 4)},
                "held_out_pixel_accuracy": round(accuracy, 4),
                "seconds": round(time.time() - start, 1),
                "torch": torch.__version__,
                "history": history,
            },
            indent=1,
        )
        + "\n"
    )
    size = args.weights.stat().st_size // 1024
    print(f"wrote {args.weights} ({size} KiB), {args.log}")


if __name__ == "__main__":
    main()
