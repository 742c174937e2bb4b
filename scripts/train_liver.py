"""Train the demo's liver/tumour networks on the real CT volume (segcam.apps.demo.data), 2D and 3D.

    .venv/bin/python scripts/train_liver.py --out src/segcam/apps/demo/weights --log-dir scripts \
        [--which 2d|3d|both]

Data: case 117 (LiTS-derived) from the cached wheel (`make data`). CT window -200..300 HU mapped
to [0, 1]. Split by axial slices (segcam.apps.demo.data): 56..79 held out, 48..55 and 80..87
unused gaps,
0..47 and 88..127 train.
- 2D: MONAI UNet (16..128 channels) on axial slices, random shifts and intensity jitter.
- 3D: MONAI UNet (8..64 channels) on random (64, 64, 32) patches lying wholly inside one
  training slab; tested on the whole volume, Dice over the held-out slices.
Loss: Dice + cross-entropy. Fixed seeds. Writes OUT/liver_unet{2d,3d}.pt (state_dict,
tensors only) and LOG_DIR/train_liver_{2d,3d}.log.json with held-out Dice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from segcam.apps.demo import data as liver
from segcam.apps.demo.models import build_liver_model, held_out_dice


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scale = 1 + 0.1 * (torch.rand(x.shape[0], *[1] * (x.ndim - 1), generator=generator) - 0.5) * 2
    shift = 0.05 * (torch.rand(x.shape[0], *[1] * (x.ndim - 1), generator=generator) - 0.5) * 2
    noise = 0.02 * torch.randn(x.shape, generator=generator)
    return x * scale + shift + noise


def batches_2d(image, labels, batch, generator):
    # image, labels: (slices, 128, 128), the training axial slices only
    while True:
        index = torch.randint(len(image), (batch,), generator=generator)
        x, y = image[index][:, None], labels[index]
        dy, dx = (int(v) for v in torch.randint(-8, 9, (2,), generator=generator))
        yield augment(torch.roll(x, (dy, dx), (2, 3)), generator), torch.roll(y, (dy, dx), (1, 2))


def batches_3d(image, labels, batch, generator, patch=(64, 64, 32)):
    # Patches lie wholly inside one training slab along the axial axis (the last one).
    while True:
        xs, ys = [], []
        for _ in range(batch):
            block = liver.TRAIN_BLOCKS[
                int(torch.randint(len(liver.TRAIN_BLOCKS), (1,), generator=generator))
            ]
            a = int(torch.randint(0, image.shape[0] - patch[0] + 1, (1,), generator=generator))
            b = int(torch.randint(0, image.shape[1] - patch[1] + 1, (1,), generator=generator))
            c = block.start + int(
                torch.randint(0, len(block) - patch[2] + 1, (1,), generator=generator)
            )
            xs.append(image[a : a + patch[0], b : b + patch[1], c : c + patch[2]])
            ys.append(labels[a : a + patch[0], b : b + patch[1], c : c + patch[2]])
        yield augment(torch.stack(xs)[:, None], generator), torch.stack(ys)


def train(which: str, steps: int, batch: int, out: Path, log_dir: Path) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    case = liver.load_case()
    windowed = liver.window(case.image)
    if which == "3d":
        image, labels = torch.from_numpy(windowed), torch.from_numpy(case.labels)
        stream = batches_3d(image, labels, batch, generator)
    else:
        image = torch.from_numpy(liver.axial_slices(windowed, liver.TRAIN_SLICES))
        labels = torch.from_numpy(liver.axial_slices(case.labels, liver.TRAIN_SLICES))
        stream = batches_2d(image, labels, batch, generator)
    model = build_liver_model(which)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    history, start = [], time.time()
    model.train()
    for step in range(steps):
        x, y = next(stream)
        loss = loss_fn(model(x), y[:, None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(float(loss), 5)})
            print(
                f"[{which}] step {step:5d}  loss {float(loss):.4f}  {time.time() - start:.0f}s",
                flush=True,
            )
    model.eval()
    dice = held_out_dice(model, which, case)
    print(f"[{which}] held-out Dice: liver {dice['liver']:.4f}, tumour {dice['tumour']:.4f}")
    weights = out / f"liver_unet{which}.pt"
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, weights)
    log = log_dir / f"train_liver_{which}.log.json"
    log.write_text(
        json.dumps(
            {
                "model": which,
                "steps": steps,
                "batch": batch,
                "window_hu": list(liver.WINDOW),
                "axial_axis": liver.AXIAL_AXIS,
                "train_slices": [[b.start, b.stop - 1] for b in liver.TRAIN_BLOCKS],
                "held_out_slices": [liver.HELD_OUT_SLICES.start, liver.HELD_OUT_SLICES.stop - 1],
                "held_out_dice": {k: round(v, 4) for k, v in dice.items()},
                "seconds": round(time.time() - start, 1),
                "torch": torch.__version__,
                "history": history,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {weights} ({weights.stat().st_size // 1024} KiB), {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights")
    parser.add_argument("--log-dir", type=Path, required=True, help="folder for the logs")
    parser.add_argument("--which", choices=["2d", "3d", "both"], default="both")
    parser.add_argument("--steps-2d", type=int, default=1500)
    parser.add_argument("--steps-3d", type=int, default=1200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.which in ("2d", "both"):
        train("2d", args.steps_2d, batch=8, out=args.out, log_dir=args.log_dir)
    if args.which in ("3d", "both"):
        train("3d", args.steps_3d, batch=2, out=args.out, log_dir=args.log_dir)


if __name__ == "__main__":
    main()
