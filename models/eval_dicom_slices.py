"""Per-slice check on real DICOM series with radiologist slice labels (COVID-CT-MD), through the appliance's path.

    python -m models.eval_dicom_slices [--bundles DIR] [--json]

For each labelled series (P001, COVID-19; cap001, community-acquired pneumonia): the share of radiologist-labelled
infection slices that get a lesion box, the share of unlabelled slices that get one (false boxes on normal-looking
slices), and the series' verdict. `--bundles`: a folder holding the valid-area and lesion bundles to use (default:
the shipped ones). Research data, read in place from ../shared/data (or $CTRIAGE_DATA).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys

import numpy as np

from models.probe_findings import DATA, read_series

LABELLED = {"P001": 0, "cap001": 55}  # rows of covid-ct-md/Slice-level-labels-updated-1.npy (Index.csv)


def slice_labels(patient: str) -> dict[float, int]:
    """Slice position (patient z, mm) → radiologist label; the label rows run head first (SliceLocation highest
    first)."""
    import pydicom

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in glob.glob(str(DATA / "covid-ct-md" / patient / "*.dcm"))]
    heads.sort(key=lambda h: float(h.SliceLocation), reverse=True)
    row = np.load(DATA / "covid-ct-md" / "Slice-level-labels-updated-1.npy")[LABELLED[patient]]
    return {float(h.ImagePositionPatient[2]): int(row[r]) for r, h in enumerate(heads)}


def evaluate(patient: str, analyzer) -> dict:
    findings = read_series(analyzer, DATA / "covid-ct-md" / patient)
    labels = slice_labels(patient)
    zs = np.array(sorted(labels))
    pos, neg = [], []
    for f in findings:
        z = zs[np.argmin(np.abs(zs - f.position))]
        (pos if labels[float(z)] else neg).append(bool(f.boxes))
    from appliance.pipeline.case_logic import decide

    d = decide(findings, analyzer.rule)
    return {"series": patient, "slices": len(findings), "labelled": len(pos),
            "labelled_boxed": int(sum(pos)), "unlabelled": len(neg), "unlabelled_boxed": int(sum(neg)),
            "sensitivity": round(sum(pos) / max(1, len(pos)), 4),
            "false_box_rate": round(sum(neg) / max(1, len(neg)), 4), "result": d.result,
            "noise": (d.acquisition or {}).get("noise"), "smoothed": (d.acquisition or {}).get("smoothed_slices")}


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    from appliance.pipeline.analyzer import Analyzer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-denoise", action="store_true", help="analyse without smoothing noisy crops")
    a = ap.parse_args(argv)
    from appliance.config import AnalysisConfig

    analyzer = Analyzer.load(AnalysisConfig(denoise=not a.no_denoise), bundle_dir=a.bundles)
    print("bundles:", ", ".join(f"{b['name']} {b['version']}" for b in analyzer.bundles), file=sys.stderr)
    for patient in LABELLED:
        if not (DATA / "covid-ct-md" / patient).exists():
            print(f"SKIP {patient}: {DATA / 'covid-ct-md' / patient} is absent", file=sys.stderr)
            continue
        r = evaluate(patient, analyzer)
        print(json.dumps(r) if a.json else
              f"{patient}: {r['labelled_boxed']}/{r['labelled']} labelled slices boxed ({r['sensitivity']:.1%}), "
              f"{r['unlabelled_boxed']}/{r['unlabelled']} unlabelled boxed ({r['false_box_rate']:.1%}); "
              f"series {r['result']}; noise {r['noise']}, {r['smoothed']} slices smoothed")


if __name__ == "__main__":
    main()
