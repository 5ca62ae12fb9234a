"""Probe: the shipped analyzer over every real HU series at hand → foci, solid lesions, the foci they explain, grade.

    .venv/bin/python -m models.probe_findings [--json]

Series (under ../shared/data, or $CTRIAGE_DATA; each skipped with a printed reason when absent): COVID-CT-MD P001
(COVID-19) and cap001 (community-acquired pneumonia), Lung-PET-CT-Dx A0001 (lung cancer), the three LIDC-IDRI
runs (nodules). NY-SBU holds single slices, not series. The TB Portals and TotalSegmentator NIfTI volumes are read
only when nibabel is installed. Research data, read in place: nothing is copied into the project.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.domain import SliceFinding
from appliance.pipeline.analyzer import Analyzer
from appliance.pipeline.case_logic import slices_needed
from appliance.pipeline.grading import Grade, grade
from appliance.pipeline.solid_lesions import SolidLesion, explain, focus_members, link_solids
from models.data import DATA  # noqa: F401 - the research data root, re-exported for the probes

SERIES = {
    "P001 (COVID-19)": "covid-ct-md/P001",
    "cap001 (CAP)": "covid-ct-md/cap001",
    "A0001 (lung cancer)": "lung-pet-ct-dx-A0001",
    "LIDC-IDRI-0001": "lidc-idri-samples/small/LIDC-IDRI-0001",
    "LIDC-IDRI-0002": "lidc-idri-samples/small/LIDC-IDRI-0002",
    "LIDC-IDRI-0003": "lidc-idri-samples/small/LIDC-IDRI-0003",
}
NIFTI = {"TB Portals": "tb-portal-volumes/data", "TotalSegmentator chest": "totalsegmentator-ct-nifti"}


def read_series(analyzer: Analyzer, folder: Path) -> list[SliceFinding]:
    """Findings of the (largest) DICOM series under folder, in series order, through the appliance's own path."""
    from appliance.oneshot import analyze_path

    reports, _ = analyze_path(folder, analyzer, b"probe")
    return max(reports, key=lambda r: len(r.findings)).findings


def probe(findings: list[SliceFinding], analyzer: Analyzer) -> dict:
    """Foci (each spanning a qualifying run), solid lesions, which foci they explain, and the grade."""
    rule = analyzer.rule
    need = slices_needed(findings, rule.min_run, rule.min_run_mm)
    positions = [f.position for f in findings]
    per_slice = [f.solids for f in findings]
    solids = link_solids(per_slice, positions, [f.lung for f in findings], rule.gap_factor)
    foci = [m for m in focus_members(findings, rule.gap_factor) if m[-1][0] - m[0][0] + 1 >= need]
    explained: list[tuple[list, SolidLesion]] = []
    left = []
    for m in foci:
        by = explain(m, solids, per_slice)
        (explained.append((m, by)) if by else left.append(m))
    g: Grade = grade([f.measures for f in findings], len(left), positions, [s for _, s in explained])
    return {
        "slices": len(findings), "lesion_slices": sum(1 for f in findings if f.boxes),
        "foci": [f"{m[0][0]}-{m[-1][0]} ({len(m)} boxes)" for m in foci],
        "solids": [f"{s.kind} {s.diameter_mm:.0f} mm, slices {s.first_slice}-{s.last_slice}, {s.quadrant}"
                   for s in solids],
        "explained": [f"{m[0][0]}-{m[-1][0]} by {s.kind} {s.diameter_mm:.0f} mm" for m, s in explained],
        "foci_left": len(left), "grade": g.to_dict(), "grade_text": g.describe(),
        "measures_ms": round(sum(f.timings_ms.get("measures", 0.0) for f in findings) / max(len(findings), 1), 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per series instead of the table")
    a = ap.parse_args(argv)
    analyzer = Analyzer.load()
    rows = {}
    for name, rel in SERIES.items():
        folder = DATA / rel
        if not folder.exists():
            print(f"SKIP {name}: {folder} is absent", file=sys.stderr)
            continue
        rows[name] = probe(read_series(analyzer, folder), analyzer)
    for name, rel in NIFTI.items():  # resampled volumes without DICOM geometry: not read by this probe
        why = "nibabel is not installed" if not _has_nibabel() else "NIfTI volumes are not series the appliance reads"
        print(f"SKIP {name} ({DATA / rel}): {why}", file=sys.stderr)
    if a.json:
        for name, r in rows.items():
            print(json.dumps({"series": name, **r}))
        return
    for name, r in rows.items():
        g = r["grade"]
        print(f"## {name}: {r['slices']} slices, {r['lesion_slices']} with lesion "
              f"(solids + measures {r['measures_ms']} ms/slice)")
        print(f"   foci ({len(r['foci'])}): {', '.join(r['foci']) or '-'}")
        print(f"   solid lesions: {'; '.join(r['solids']) or '-'}")
        print(f"   explained: {', '.join(r['explained']) or '-'}; foci left: {r['foci_left']}")
        print(f"   grade: {r['grade_text']}")
        print(f"   extent % {g['extent']}, regions {g['regions']}, lesion {g['lesion_ml']} ml")


def _has_nibabel() -> bool:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
