"""Validate a lesion bundle on the held-back split and sweep its thresholds (probability, minimum area, score).

    python -m models.tune --bundles models/bundles [--backend openvino] [--precision int8]

Uses only the validation split recorded in models/data.py (10 radiologist slices, 2 pseudo-labelled patients,
140 non-COVID crops, our own HU crops of a normal chest volume) through the appliance's own code path
(image crops → LesionDetector → boxes), so the figures are the appliance's figures. Prints JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from appliance.config import AnalysisConfig
from appliance.domain import Rect, SliceImage
from appliance.imaging import resize
from appliance.pipeline.analyzer import Analyzer
from appliance.pipeline.case_logic import CaseRule, decide
from models.data import DATA, SEMI, VAL_PSEUDO_PATIENTS, _natural_key, prepare_lesion
from models.train import dice_np


def _img(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def validation_sets(seed: int = 0) -> dict[str, list[tuple[str, np.ndarray, np.ndarray | None]]]:
    """name -> [(id, image01 at native crop size, mask or None)] for the held-back split."""
    d = np.load(prepare_lesion())
    val = d["split"] == "val"
    groups = {s: set(d["group"][val & (d["src"] == s)].tolist()) for s in ("doctor", "noncovid")}
    out: dict[str, list] = {"doctor": [], "pseudo": [], "noncovid": [], "hu-chest": []}
    for p in sorted(glob.glob(str(SEMI / "Doctor-label" / "Imgs" / "*.jpg")), key=_natural_key):
        if Path(p).stem in groups["doctor"]:
            gt = _img(str(SEMI / "Doctor-label" / "GT" / (Path(p).stem + ".png"))) > 0.5
            out["doctor"].append((Path(p).stem, _img(p), gt))
    for p in sorted(glob.glob(str(SEMI / "Pseudo-label" / "Imgs" / "*.jpg")), key=_natural_key):
        patient = re.sub(r"^Data-1_|_\d+\.jpg$", "", Path(p).name)
        if patient in VAL_PSEUDO_PATIENTS:
            gt = _img(str(SEMI / "Pseudo-label" / "GT" / (Path(p).stem + ".png"))) > 0.5
            out["pseudo"].append((Path(p).stem, _img(p), gt))
    for p in sorted(glob.glob(str(DATA / "sarscov2-ct-noncovid" / "*.png")), key=_natural_key):
        if Path(p).stem in groups["noncovid"]:
            out["noncovid"].append((Path(p).stem, _img(p), None))
    x = d["x"][val & (d["src"] == "hu-ts-chest")]
    out["hu-chest"] = [(f"ts-chest-{i}", x[i].astype(np.float32) / 255.0, None) for i in range(len(x))]
    return out


def run_images(analyzer: Analyzer, items: list, standardise_window: bool = True) -> list:
    """Through the appliance's own image path: the set's window standardised as `image_series` does."""
    from appliance.pipeline.crop_window import landmarks, standardise

    imgs = [img for _, img, _ in items]
    if standardise_window:
        imgs = standardise(imgs, landmarks(imgs))
    slices = [SliceImage(key=i, series_uid="v", study_uid="v", position=-float(k), window01=img)
              for k, ((i, _, _), img) in enumerate(zip(items, imgs))]
    return analyzer.findings(slices, keep_prob=True)


def boxes_at(analyzer: Analyzer, f, shape, thr: float, min_area: float, min_score: float):
    le = analyzer.lesion
    old = (le.threshold, le.min_area, le.min_score)
    le.threshold, le.min_area, le.min_score = thr, min_area, min_score
    try:
        return le.boxes(f.prob.astype(np.float32), Rect(0, 0, *shape), shape, (shape[0] / 2, shape[1] / 2),
                        crop_is_slice=True)
    finally:
        le.threshold, le.min_area, le.min_score = old


def dice_of(f, gt: np.ndarray, thr: float) -> float:
    pred = resize(f.prob.astype(np.float32), gt.shape) >= thr
    return dice_np(pred, gt)


def per_patient_hu(analyzer: Analyzer) -> dict[str, str]:
    """Whole real HU series through the full pipeline: A0001 (tumour, training data) and NY-SBU slices."""
    from appliance.oneshot import analyze_path
    from appliance.privacy import pseudonym  # noqa: F401

    res = {}
    p = DATA / "lung-pet-ct-dx-A0001"
    if p.exists():
        reps, _ = analyze_path(p, analyzer, b"validation")
        for r in reps:
            ev = r.verdict.evidence
            res["A0001 (lung cancer, 5 mm, training data)"] = f"{r.verdict.result} lesion_slices={r.verdict.lesion_slices}/{r.verdict.slices}" + (
                f" run {ev.quadrant} {ev.run}" if ev else "")
    return res


def agreement(bundles: str | None, backend: str, thresholds=(0.2, 0.25, 0.3, 0.4, 0.5)) -> dict:
    """INT8 vs FP32 lesion masks on the real validation images through the appliance path.

    `lesion_images`: mean Dice over the COVID validation images (radiologist and pseudo-labelled);
    `all_pooled`: Dice of all masks pooled over every validation image, negatives included (an empty image has
    no per-image Dice, so pooling is how negatives count).
    """
    sets = validation_sets()
    probs = {}
    for prec in ("fp32", "int8"):
        an = Analyzer.load(replace(AnalysisConfig(), backend=backend, precision=prec), bundles)
        probs[prec] = {k: [f.prob.astype(np.float32) for f in run_images(an, v, standardise_window=k != "hu-chest")]
                       for k, v in sets.items()}
    out: dict = {"backend": backend, "bundles": an.bundles, "n_images": {k: len(v) for k, v in sets.items()}}
    for t in thresholds:
        les = [dice_np(p >= t, q >= t) for k in ("doctor", "pseudo") for p, q in zip(probs["fp32"][k], probs["int8"][k])]
        inter = tot = 0.0
        for k in sets:
            for p, q in zip(probs["fp32"][k], probs["int8"][k]):
                a, b = p >= t, q >= t
                inter += float(np.logical_and(a, b).sum())
                tot += float(a.sum() + b.sum())
        out[str(t)] = {"lesion_images": round(float(np.mean(les)), 4), "all_pooled": round(2 * inter / max(tot, 1.0), 4)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", default=None)
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--sweep", action="store_true", help="sweep thresholds")
    ap.add_argument("--agreement", action="store_true",
                    help="INT8 vs FP32 mask Dice on the validation images (each backend), at several thresholds")
    a = ap.parse_args(argv)
    if a.agreement:
        print(json.dumps(agreement(a.bundles, a.backend), indent=1))
        return
    analyzer = Analyzer.load(replace(AnalysisConfig(), backend=a.backend, precision=a.precision), a.bundles)
    sets = validation_sets()
    # the hu-chest crops are already in the appliance's window (made from HU by the pipeline's own crop)
    found = {k: run_images(analyzer, v, standardise_window=k != "hu-chest") for k, v in sets.items()}
    le = analyzer.lesion

    def metrics(thr, min_area, min_score):
        def pos(k):
            return [bool(boxes_at(analyzer, f, it[1].shape, thr, min_area, min_score)) for f, it in zip(found[k], sets[k])]
        doc, pse = pos("doctor"), pos("pseudo")
        neg = pos("noncovid") + pos("hu-chest")
        # per patient on the two held-back pseudo-labelled patients (consecutive slices)
        pats = {}
        for (i, img, _), f in zip(sets["pseudo"], found["pseudo"]):
            pid = re.sub(r"_\d+$", "", i)
            k = int(re.findall(r"_(\d+)$", i)[0])
            b = boxes_at(analyzer, f, img.shape, thr, min_area, min_score)
            pats.setdefault(pid, []).append((k, b, img.shape))
        pat_res = {}
        for pid, lst in pats.items():
            lst.sort()
            fs = []
            for k, b, shape in lst:
                from appliance.domain import SliceFinding

                fs.append(SliceFinding(str(k), -float(k), shape, Rect(0, 0, *shape), b))
            pat_res[pid] = decide(fs, CaseRule.chen2020(min_slices=1)).result
        return {
            "threshold": thr, "min_area_px": min_area, "min_score": min_score,
            "sens_doctor": float(np.mean(doc)), "sens_pseudo": float(np.mean(pse)),
            "spec_noncovid": 1 - float(np.mean(pos("noncovid"))), "spec_hu_chest": 1 - float(np.mean(pos("hu-chest"))),
            "spec_all": 1 - float(np.mean(neg)), "n_neg": len(neg),
            "dice_doctor": float(np.mean([dice_of(f, it[2], thr) for f, it in zip(found["doctor"], sets["doctor"])])),
            "dice_pseudo": float(np.mean([dice_of(f, it[2], thr) for f, it in zip(found["pseudo"], sets["pseudo"])])),
            "patients": pat_res,
        }

    base = metrics(le.threshold, le.min_area, le.min_score)
    out = {"bundles": analyzer.bundles, "backend": analyzer.backend, "precision": analyzer.precision,
           "device": analyzer.device, "current": base, "hu_series": per_patient_hu(analyzer)}
    if a.sweep:
        grid = []
        for thr in (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7):
            for area in (25, 50, 100, 200):
                for sc in sorted({thr, 0.5, 0.6, 0.7, 0.8, 0.9}):
                    if sc < thr:
                        continue
                    m = metrics(thr, area, sc)
                    m.pop("patients")
                    grid.append(m)
        out["sweep"] = grid
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
