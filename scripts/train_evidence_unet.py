"""Train the evidence benchmark's network (segcam.testing.evidence): a small MONAI UNet.

    .venv/bin/python scripts/train_evidence_unet.py \
        --weights src/segcam/apps/demo/weights/evidence_unet2d.pt \
        --log scripts/train_evidence_unet.log.json

Training scenes: seeds 0..3999; held-out: seeds from 2_000_000 (never trained on). Writes the
weights (tensors only) and the log where the command line says.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from segcam.apps.demo.models import build_demo_model
from segcam.apps.evaluation.benchmarks import EVIDENCE_HELD_OUT_SEED, evidence_accuracy
from segcam.testing.evidence import evidence_batch

TRAIN, STEPS, BATCH = 4000, 2500, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="where to write the weights")
    parser.add_argument("--log", type=Path, required=True, help="where to write the training log")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    images, labels = evidence_batch(range(TRAIN))
    model = build_demo_model("evidence-2d")
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=STEPS)
    # Background dominates the pixels: weigh the object classes up so the cue is learnt.
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 1.0]))
    order = np.random.default_rng(0)
    history, start = [], time.time()
    model.train()
    for step in range(STEPS):
        index = order.integers(0, TRAIN, size=BATCH)
        loss = loss_fn(model(torch.from_numpy(images[index])), torch.from_numpy(labels[index]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == STEPS - 1:
            history.append({"step": step, "loss": round(float(loss), 5)})
            print(f"step {step:5d}  loss {float(loss):.4f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    scores = evidence_accuracy(model)
    print("held-out:", json.dumps(scores))
    torch.save(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, args.weights
    )
    args.log.write_text(
        json.dumps(
            {
                "steps": STEPS,
                "batch": BATCH,
                "train_seeds": [0, TRAIN - 1],
                "held_out_seed_start": EVIDENCE_HELD_OUT_SEED,
                "held_out": scores,
                "seconds": round(time.time() - start, 1),
                "torch": torch.__version__,
                "history": history,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.weights}, {args.log}")


if __name__ == "__main__":
    main()
