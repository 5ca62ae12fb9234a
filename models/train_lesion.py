"""Train the lesion UNet++ on lung-window lung-box crops.

    python -m models.train_lesion --name lesion-w8l4 --steps 2500

Batches mix radiologist-labelled slices (hard masks), pseudo-labelled consecutive slices (soft targets, loss
weight 0.5) and real non-COVID negatives (crop sets and our own HU crops). Validation: Dice on the 10 held-back
radiologist slices and on 2 held-back pseudo-labelled patients, image-level specificity on held-back negatives.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from models.data import prepare_lesion
from models.train import TrainConfig, dice_np, largest_component, predict, run

# 25 px at 512² scale, expressed at the model scale of a typical ~330×250 lung-box crop (20 px at 256²).
MIN_AREA_MODEL_PX = 16


def load(cfg: TrainConfig):
    d = np.load(prepare_lesion())
    x, y, src, split = d["x"], d["y"], d["src"], d["split"]
    if cfg.size != x.shape[1]:
        x = _resize_all(x, cfg.size)
        y = _resize_all(y, cfg.size)
    tr = split == "train"
    if cfg.extra.get("all_doctor"):
        tr = tr | (src == "doctor")  # the held-back radiologist slices train too: their "validation" is a fit
    hu = np.char.startswith(src.astype(str), "hu-")
    data = {
        "doctor": (x[tr & (src == "doctor")], y[tr & (src == "doctor")], 1.0, 1.0),
        "pseudo": (x[tr & (src == "pseudo")], y[tr & (src == "pseudo")], 0.5, 0.5),
        "noncovid": (x[tr & (src == "noncovid")], y[tr & (src == "noncovid")], 1.0, 0.0),
        "hu-neg": (x[tr & hu], y[tr & hu], 1.0, 0.0),
    }
    va = split == "val"
    val = {
        "doctor": (x[va & (src == "doctor")], y[va & (src == "doctor")]),
        "pseudo": (x[va & (src == "pseudo")], y[va & (src == "pseudo")]),
        "neg": (x[va & ((src == "noncovid") | hu)], None),
    }
    return data, val


def _resize_all(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in a])


def make_validate(val):
    def validate(model: torch.nn.Module) -> dict[str, float]:
        m: dict[str, float] = {}
        for k in ("doctor", "pseudo"):
            x, y = val[k]
            p = predict(model, x) >= 0.5
            m[f"dice_{k}"] = float(np.mean([dice_np(a, b > 127) for a, b in zip(p, y)]))
            m[f"sens_{k}"] = float(np.mean([largest_component(a) > MIN_AREA_MODEL_PX for a in p]))
        p = predict(model, val["neg"][0]) >= 0.5
        m["spec_neg"] = float(np.mean([largest_component(a) <= MIN_AREA_MODEL_PX for a in p]))
        return m

    return validate


def score(m: dict[str, float]) -> float:
    return m["dice_doctor"] + 0.5 * m["dice_pseudo"] + m["spec_neg"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="lesion")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--stem", type=int, default=1, choices=[1, 2], help="2: nested decoder at half resolution")
    ap.add_argument("--upsample", default="bilinear", choices=["bilinear", "nearest"],
                    help="×2 upsampling in the decoder (nearest: about a fifth less inference time)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--size", type=int, default=224, help="model input size (crops are resized to it)")
    ap.add_argument("--mix", default="doctor=3,pseudo=2,noncovid=2,hu-neg=1",
                    help="share of each source in a batch")
    ap.add_argument("--blob-weight", type=float, default=0.3, help="penalty on confident blobs in negatives")
    ap.add_argument("--masses", type=float, default=0.0, help="share of negatives given synthetic nodules/masses")
    ap.add_argument("--init", default="", help="start from this run's best checkpoint (fine-tuning)")
    ap.add_argument("--init-onnx", default="", metavar="MODEL_ONNX",
                    help="start from an exported FP32 model (a bundle's model.onnx); BatchNorm statistics frozen")
    ap.add_argument("--blob-start", type=int, default=300, help="step where the blob penalty starts ramping in")
    ap.add_argument("--corr-noise", type=float, default=0.0, metavar="P",
                    help="share of slices given CT-like (correlated) noise, SD 0.01 to --corr-noise-max")
    ap.add_argument("--corr-noise-max", type=float, default=0.06)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--deep-supervision", type=float, default=0.0, metavar="W",
                    help="UNet++ deep supervision: weight of the shallower top-row outputs' loss (0: off)")
    ap.add_argument("--teacher", action="append", default=[], metavar="MODEL_ONNX",
                    help="distil: the taught groups learn the mean map of these exported models (repeat)")
    ap.add_argument("--all-doctor", action="store_true",
                    help="also train on the 10 held-back radiologist slices (a final model once the recipe is "
                         "chosen); its radiologist-slice validation is then a training fit, so the last step is kept")
    ap.add_argument("--teach", default="pseudo", help="groups whose targets the teachers give (comma-separated)")
    a = ap.parse_args(argv)
    mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
    cfg = TrainConfig(name=a.name, task="lesion", width=a.width, levels=a.levels, stem=a.stem, upsample=a.upsample, size=a.size, steps=a.steps,
                      batch=a.batch, lr=a.lr, seed=a.seed, threads=a.threads, eval_every=a.eval_every,
                      warmup=a.warmup, mix=mix,
                      extra={"blob_weight": a.blob_weight, "masses": a.masses, "init": a.init,
                             "blob_start": a.blob_start, "blob_full": a.blob_start + 500,
                             "init_onnx": a.init_onnx, "freeze_bn": bool(a.init_onnx),
                             "deep_supervision": a.deep_supervision, "teachers": a.teacher,
                             "teach_groups": a.teach.split(","),
                             "all_doctor": a.all_doctor, "keep_last": a.all_doctor,
                             "corr_noise": a.corr_noise, "corr_noise_max": a.corr_noise_max})
    data, val = load(cfg)
    run(cfg, data, make_validate(val), score)


if __name__ == "__main__":
    main()
