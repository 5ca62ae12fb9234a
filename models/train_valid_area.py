"""Train the valid-area UNet++ (lung mask on a downsized full slice; labels from the classical HU lung mask).

    python -m models.train_valid_area --name valid-area-w8l3 --steps 1000

Validation: lung-mask Dice on held-out slices, and the lung/no-lung decision per slice against the labeler
(neck, head and abdomen slices must give no lung).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from models.data import prepare_valid_area
from models.train import TrainConfig, dice_np, largest_component, predict, run

# Lung present when the largest component covers ≥ 6 cm²: at 128² of a ~350 mm field, 1 px ≈ 7.5 mm² (80 px);
# scaled to the model size.
MIN_LUNG_PX_128 = 80


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="valid-area")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--size", type=int, default=96, help="model input size (slices are resized to it)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=int, default=2, choices=[1, 2, 3], help="training-set version (models.data)")
    ap.add_argument("--consolidate", type=float, default=0.0,
                    help="share of lung samples given synthetic consolidation (models.train.paste_consolidation)")
    a = ap.parse_args(argv)
    d = np.load(prepare_valid_area(version=a.data))
    x, y, split = d["x"], d["y"], d["split"]
    if a.size != x.shape[1]:
        from models.train_lesion import _resize_all

        x, y = _resize_all(x, a.size), (_resize_all(y, a.size) > 127).astype(np.uint8) * 255
    has = (y > 127).reshape(len(y), -1).sum(1) > 0
    tr, va = split == "train", split == "val"
    data = {"lung": (x[tr & has], y[tr & has], 1.0, 1.0), "none": (x[tr & ~has], y[tr & ~has], 1.0, 0.0)}
    vx, vy = x[va], y[va] > 127

    def validate(model: torch.nn.Module) -> dict[str, float]:
        p = predict(model, vx) >= 0.5
        min_px = MIN_LUNG_PX_128 * (a.size / 128) ** 2
        lung_pred = np.array([largest_component(m) >= min_px for m in p])
        lung_true = np.array([largest_component(m) >= min_px for m in vy])
        dices = [dice_np(a_, b_) for a_, b_, t in zip(p, vy, lung_true) if t]
        return {"dice": float(np.mean(dices)) if dices else 0.0, "lung_decision_acc": float((lung_pred == lung_true).mean())}

    cfg = TrainConfig(name=a.name, task="valid-area", width=a.width, levels=a.levels, size=a.size,
                      steps=a.steps, batch=8, lr=3e-3, seed=a.seed, threads=a.threads, eval_every=100,
                      dihedral=False, rotate_deg=8.0, scale=(0.85, 1.15), intensity=0.5,
                      mix={"lung": 6, "none": 2}, extra={"consolidate": a.consolidate})
    run(cfg, data, validate, lambda m: m["dice"] + m["lung_decision_acc"])


if __name__ == "__main__":
    main()
