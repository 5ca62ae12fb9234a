"""Build the held-out validation datasets behind the model cards, in `ctriage evaluate`'s layout.

    python -m models.make_eval_set /tmp/ctriage-eval
    ctriage evaluate /tmp/ctriage-eval/images   --json --report /tmp/ctriage-eval/report-images
    ctriage evaluate /tmp/ctriage-eval/patients --json --report /tmp/ctriage-eval/report-patients
    ctriage evaluate /tmp/ctriage-eval/pseudo-patients

images/    per-image protocol on what training never saw: the 10 held-back radiologist-labelled crops (covid/, with
           their masks: Dice) and the 140 held-back non-COVID crops (control/, specificity)
patients/  per-patient protocol on whole series: the 2 held-back pseudo-label COVID patients (consecutive crops,
           covid/), and real HU series without COVID as controls: Lung-PET-CT-Dx A0001 (lung cancer, DICOM) and
           the two TotalSegmentator volumes written as DICOM (normal chest crop, abdomen with lung bases).
           A0001 and the TotalSegmentator volumes were also *training negatives* (hu-neg): they test that the
           case rule holds on real series, not generalisation.
pseudo-patients/  every pseudo-labelled COVID-19 series (all 14: 12 of them were training data), grouped by patient
           (covid/<patient>/<series>/): a patient is positive when any of its series is, as the appliance's study
           verdict is. Two Radiopaedia cases have two series each (case 10: a 19-slice excerpt beside its full
           207-slice series; case 29: 19 slices with clear lungs beside 22 with lesion). A check that the case
           rule finds every COVID-19 patient of the set, not generalisation.

Everything is written outside the project (links to ../shared/data, or DICOM made from its volumes): the data is
licensed for non-commercial research only and must not be copied into the repository.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from models.data import DATA, SEMI, VAL_PSEUDO_PATIENTS, doctor_files, held_out, noncovid_files
from models.make_series import VOLUMES, write_volumes

A0001 = DATA / "lung-pet-ct-dx-A0001" / "Lung-PET-CT-Dx"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())


def build_images(out: Path, seed: int = 0) -> dict[str, int]:
    doc, non = doctor_files(), noncovid_files()
    if (len(doc), len(non)) != (50, 700):
        raise SystemExit(f"expected 50 doctor and 700 non-COVID slices under {DATA}, found {len(doc)} and {len(non)}")
    held = held_out(seed)
    for i in sorted(held["doctor"]):
        p = Path(doc[i])
        _link(p, out / "covid" / "doctor-val" / p.name)
        _link(SEMI / "Doctor-label" / "GT" / (p.stem + ".png"), out / "masks" / "doctor-val" / (p.stem + ".png"))
    for i in sorted(held["noncovid"]):
        p = Path(non[i])
        _link(p, out / "control" / "noncovid-val" / p.name.replace(" ", "_"))
    return {"covid": len(held["doctor"]), "control": len(held["noncovid"])}


def build_patients(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for patient in VAL_PSEUDO_PATIENTS:
        files = sorted((SEMI / "Pseudo-label" / "Imgs").glob(f"Data-1_{patient}_*.jpg"))
        for p in files:
            _link(p, out / "covid" / patient / p.name)
        counts[patient] = len(files)
    series = sorted(A0001.rglob("*.dcm"))
    for p in series:
        _link(p, out / "control" / "lpcd-A0001" / p.name)
    counts["lpcd-A0001"] = len(series)
    counts.update(write_volumes(out / "control", tuple(VOLUMES)))  # the card's controls: not the TB volumes
    return counts


def pseudo_patient(series: str) -> str:
    """The patient a pseudo-labelled series belongs to: `coronacases_org_004` → `coronacases-004`,
    `radiopaedia_org_covid-19-pneumonia-29_86490_1-dcm` → `radiopaedia-29` (the Radiopaedia case number; a case's
    studies and series share it)."""
    m = re.fullmatch(r"coronacases_org_(\d+)", series)
    if m:
        return f"coronacases-{m.group(1)}"
    m = re.fullmatch(r"radiopaedia_org_.*?-(\d+)_\d+_\d+(-dcm)?", series)
    if m:
        return f"radiopaedia-{m.group(1)}"
    raise ValueError(f"not a pseudo-labelled series name this set knows: {series!r}")


def build_pseudo_patients(out: Path) -> dict[str, int]:
    """covid/<patient>/<series>/ links to every pseudo-labelled slice; returns slices per patient."""
    counts: dict[str, int] = {}
    for p in sorted((SEMI / "Pseudo-label" / "Imgs").glob("Data-1_*.jpg")):
        series = p.stem[len("Data-1_"):].rsplit("_", 1)[0]
        patient = pseudo_patient(series)
        _link(p, out / "covid" / patient / series / p.name)
        counts[patient] = counts.get(patient, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m models.make_eval_set OUT_DIR")
    out = Path(args[0]).resolve()
    if Path(__file__).resolve().parents[1] in out.parents:
        raise SystemExit(f"{out} is inside the project: the research data must not be copied into it")
    if out.exists():
        shutil.rmtree(out)
    print(f"{out}/images:", build_images(out / "images"))
    print(f"{out}/patients:", build_patients(out / "patients"))
    print(f"{out}/pseudo-patients:", build_pseudo_patients(out / "pseudo-patients"))


if __name__ == "__main__":
    main()
