"""Two valid-area bundles side by side on every real DICOM series at hand, against the HU lung box.

    python -m models.compare_valid_area OLD_BUNDLE_DIR NEW_BUNDLE_DIR [--json]

Per series: slices where the two agree on lung / no lung, the IoU of their lung boxes, and each one's IoU with
the lung box of a classic HU lung mask (`appliance.pipeline.classic_lung`, grown by the same margin) on slices
where that mask finds lung — the reference that catches a box pulled onto stomach gas or cut short of the bases.
Reported as mean and 5th percentile. Research data, read in place from ../shared/data (or $CTRIAGE_DATA).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np

from appliance.domain import Rect
from appliance.ingest.dicom_reader import Rejected, read_slice
from appliance.inference.bundle import BundleError, load_bundle
from appliance.pipeline.classic_lung import lung_mask, mask_box
from appliance.pipeline.valid_area import ValidArea
from models.probe_findings import DATA

SERIES = {
    "P001 (COVID-19, Siemens JPEG Lossless)": "covid-ct-md/P001",
    "cap001 (pneumonia, Siemens JPEG Lossless)": "covid-ct-md/cap001",
    "A0001 (lung cancer)": "lung-pet-ct-dx-A0001",
    "LIDC-IDRI-0001": "lidc-idri-samples/small/LIDC-IDRI-0001",
    "LIDC-IDRI-0002": "lidc-idri-samples/small/LIDC-IDRI-0002",
    "LIDC-IDRI-0003": "lidc-idri-samples/small/LIDC-IDRI-0003",
    "NY-SBU slices": "covid19-ny-sbu-dicom",
    "DICOM zoo": "dicom-ct-zoo",
}


def iou(a: Rect, b: Rect) -> float:
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    inter = max(h, 0) * max(w, 0)
    return inter / max(1, a.height * a.width + b.height * b.width - inter)


def slices_of(folder: Path) -> list:
    """Decoded slices (HU) of every readable DICOM file under folder, in no particular order."""
    out = []
    for p in sorted(glob.glob(str(folder / "**" / "*"), recursive=True)):
        if not Path(p).is_file() or p.endswith((".xml", ".csv", ".npy", ".md", ".txt", ".json")):
            continue
        try:
            s = read_slice(Path(p), max_tilt_deg=10.0)
        except (Rejected, OSError, ValueError):
            continue
        out.append(s)
    return out


def compare(old: ValidArea, new: ValidArea, slices: list, batch: int = 16) -> dict:
    agree, between, ref_old, ref_new = 0, [], [], []
    for i in range(0, len(slices), batch):
        part = slices[i:i + batch]
        hus = [s.hu for s in part]
        sp = [s.pixel_spacing for s in part]
        for s, a, b in zip(part, old(hus, sp), new(hus, sp)):
            agree += (a is None) == (b is None)
            if a is not None and b is not None:
                between.append(iou(a.box, b.box))
            m = lung_mask(s.hu, s.pixel_spacing[0] * s.pixel_spacing[1])
            r = mask_box(m, old.margin) if m.any() else None
            if r is not None:
                ref = Rect(*r)
                ref_old.append(iou(a.box, ref) if a is not None else 0.0)
                ref_new.append(iou(b.box, ref) if b is not None else 0.0)

    def stats(v: list[float]) -> dict:
        return {"mean": round(float(np.mean(v)), 4), "p5": round(float(np.percentile(v, 5)), 4), "n": len(v)} if v else {}

    return {"slices": len(slices), "lung_decision_agree": agree, "box_iou_old_vs_new": stats(between),
            "old_vs_hu_box": stats(ref_old), "new_vs_hu_box": stats(ref_new)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    stages = []
    for d in (a.old, a.new):
        try:
            b = load_bundle(d)
        except BundleError as e:
            sys.exit(f"compare_valid_area: {e}")
        stages.append(ValidArea(b, b.adapter("openvino", "int8", 1, 1)))
    for name, rel in SERIES.items():
        folder = DATA / rel
        if not folder.exists():
            print(f"SKIP {name}: {folder} is absent", file=sys.stderr)
            continue
        r = compare(*stages, slices_of(folder))
        if a.json:
            print(json.dumps({"series": name, **r}))
            continue
        o, n = r["old_vs_hu_box"], r["new_vs_hu_box"]
        print(f"{name}: {r['slices']} slices, lung/no lung agree on {r['lung_decision_agree']}; box IoU old-new "
              f"mean {r['box_iou_old_vs_new'].get('mean')} p5 {r['box_iou_old_vs_new'].get('p5')}; vs HU lung box "
              f"old mean {o.get('mean')} p5 {o.get('p5')}, new mean {n.get('mean')} p5 {n.get('p5')}", flush=True)


if __name__ == "__main__":
    main()
