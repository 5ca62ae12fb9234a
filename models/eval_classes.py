"""Per-class check of a lesion bundle on the 10 held-back radiologist slices: is consolidation found as lesion too?

    python -m models.eval_classes BUNDLE_DIR [BUNDLE_DIR ...]

For each bundle and runtime (FP32, ONNX Runtime INT8, OpenVINO INT8) at the bundle's mask threshold: mean Dice
against the radiologist mask, and the share of ground-glass and of consolidation pixels inside the predicted mask
(COVID-SemiSeg multi-class labels). Crops come from the training cache (models.data.prepare_lesion2), resized to
the model's input as the appliance does.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def held_back_doctor(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image

    from models.data import prepare_lesion2

    d = np.load(prepare_lesion2())
    sel = (d["src"] == "doctor") & (d["split"] == "val")

    def rs(a: np.ndarray, mode) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(i).resize((size, size), mode)) for i in a])

    x = rs(d["x"][sel], Image.BILINEAR).astype(np.float32)[:, None] / 255.0
    return x, rs(d["y"][sel], Image.BILINEAR) > 127, rs(d["cls"][sel], Image.NEAREST)


def evaluate(bundle: Path) -> dict:
    from appliance.inference.bundle import load_bundle
    from models.export import run_bundle

    b = load_bundle(bundle, verify=True)
    thr = float(b.manifest["output"]["threshold"])
    x, y, cls = held_back_doctor(int(b.manifest["input"]["size"][0]))
    out = {}
    for name, prob in run_bundle(b.graph_files(), x).items():  # the full map
        p = prob[:, 0] >= thr
        dice = [1.0 if (a.sum() + g.sum()) == 0 else 2 * (a & g).sum() / (a.sum() + g.sum()) for a, g in zip(p, y)]
        out[name] = {"dice": round(float(np.mean(dice)), 4),
                     "ground_glass_found": round(float((p & (cls == 1)).sum() / max(1, (cls == 1).sum())), 4),
                     "consolidation_found": round(float((p & (cls == 2)).sum() / max(1, (cls == 2).sum())), 4),
                     "consolidation_share_of_mask": round(float((p & (cls == 2)).sum() / max(1, p.sum())), 4)}
    return {"bundle": f"{b.name} {b.version}", "threshold": thr, "slices": int(len(x)), **out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    for b in ap.parse_args(argv).bundles:
        print(json.dumps(evaluate(b)))


if __name__ == "__main__":
    main()
