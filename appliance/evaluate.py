"""Evaluation on a labelled dataset: Table 3 of Chen et al. 2020 (per image and per patient) plus Dice where masks exist.

    DATASET/covid/<patient>/     slices: DICOM files, or lung-window crop images (*.png, *.jpg), natural name order
    DATASET/control/<patient>/   the same
    DATASET/masks/<patient>/<file stem>.png   optional lesion masks (non-zero = lesion), same size as the image

Per image: positives = COVID images with lesion (mask non-empty; without a mask, every COVID image), negatives =
every control image; COVID images whose mask is empty are excluded. An image is called positive when the pipeline
put at least one box on it. Per patient: called positive when the case rule fires (indeterminate = negative call).

The metrics are pure numpy (`appliance/metrics.py`); `evaluate` walks the dataset and runs the analyzer.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from appliance.oneshot import analyze_files, discover, walk_files
from appliance.domain import SliceFinding
from appliance.ingest.dicom_file import is_document
from appliance.ingest.image_reader import image_series, natural_key
from appliance.publish.key_slices import largest_box_slice
from appliance.metrics import (Confusion, auc, bootstrap_mean_ci, component_score, confusion, dice, iou, mean_or_none,
                               predicted_mask, sweep)
from appliance.pipeline.case_logic import SeriesSummary, decide, study_verdict

GROUPS = ("covid", "control")


class DatasetError(ValueError):
    """The dataset folder does not have the expected layout, or a mask does not fit its image."""


@dataclass
class PatientSource:
    group: str  # "covid" | "control"
    name: str
    folder: Path
    masks: Path | None  # DATASET/masks/<patient>/ when it exists


def find_patients(root: Path) -> list[PatientSource]:
    """The patients of a dataset folder (covid/<patient>/, control/<patient>/, optional masks/<patient>/)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    present = [g for g in GROUPS if (root / g).is_dir()]
    if not present:
        raise DatasetError(f"{root}: expected covid/<patient>/ and/or control/<patient>/ folders (found neither)")
    out: list[PatientSource] = []
    seen: dict[str, str] = {}
    for g in present:
        loose = [p.name for p in (root / g).iterdir() if p.is_file() and not p.name.startswith(".")]
        if loose:
            raise DatasetError(f"{root / g} holds files directly ({loose[0]}, …): put each patient's slices in "
                               f"{g}/<patient>/")
        for d in sorted((p for p in (root / g).iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: natural_key(p.name)):
            if d.name in seen:
                raise DatasetError(f"patient {d.name!r} is in both {seen[d.name]}/ and {g}/")
            seen[d.name] = g
            m = root / "masks" / d.name
            out.append(PatientSource(g, d.name, d, m if m.is_dir() else None))
    if not out:
        raise DatasetError(f"{root}: no patient folders under {' or '.join(g + '/' for g in present)}")
    return out


def read_mask(path: Path) -> np.ndarray:
    """A lesion mask image → bool (non-zero = lesion)."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from None
    return (a != 0).any(axis=-1) if a.ndim == 3 else a != 0


# ---------------------------------------------------------------------------------------------- results


@dataclass
class ImageResult:
    patient: str
    group: str
    key: str  # file path
    kind: str  # "dicom" | "images"
    index: int  # 0-based position in its series
    finding: SliceFinding  # probability map dropped
    score: float  # component_score
    truth: bool | None  # None: excluded (COVID image with an empty mask)
    mask: Path | None = None
    mask_empty: bool | None = None
    dice: float | None = None
    iou: float | None = None
    pred_empty: bool | None = None

    @property
    def called(self) -> bool:
        return bool(self.finding.boxes)

    @property
    def image_id(self) -> str:
        """`<patient>/<file stem>`: the name its mask goes by, the same for every bundle evaluated."""
        return f"{self.patient}/{Path(self.key).stem}"


@dataclass
class PatientResult:
    source: PatientSource
    result: str  # positive | negative | indeterminate
    reason: str | None
    evidence: dict | None  # the run that fired (quadrant, first_slice, last_slice, run) in its series
    series: int
    slices: int
    lesion_slices: int
    rejected: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)  # documents beside the slices (XML, licence): not rejections
    focal: dict | None = None  # a negative's single lesion focus (its run), named for a radiologist
    grade: dict | None = None  # the pattern grade of the study verdict (category, reasons, severity, extent)
    others: list[dict] = field(default_factory=list)  # solid nodules/masses named (explained foci, or the focal mass)
    without_others: str | None = None  # the call with the other-findings stage off (every focus counts)
    acquisition: dict | None = None  # the lead series' image noise (appliance.pipeline.noise)
    deciding: list[dict] = field(default_factory=list)  # the slices that decided the call (`deciding_slices`)

    def as_dict(self) -> dict:
        return {"patient": self.source.name, "group": self.source.group, "result": self.result,
                "evidence": self.evidence, "focal": self.focal, "slices": self.slices,
                "lesion_slices": self.lesion_slices, "series": self.series, "reason": self.reason,
                "rejected": len(self.rejected), "skipped": len(self.skipped), "grade": self.grade, "others": self.others,
                "result_without_other_findings": self.without_others, "acquisition": self.acquisition,
                "deciding": [{"slice": d["index"] + 1, "what": d["what"]} for d in self.deciding]}


@dataclass
class Evaluation:
    images: list[ImageResult]
    patients: list[PatientResult]
    backend: str
    precision: str
    device: str
    bundles: list[dict]
    threshold: float
    min_area: float
    seconds: float  # analysis time (reading + models + case rule), all patients
    min_score: float | None = None  # a box's component must also peak at ≥ this probability (None: threshold)
    case_rule: str = ""  # the case rule in words, for the report

    @property
    def scored(self) -> list[ImageResult]:
        return [r for r in self.images if r.truth is not None]

    def per_image(self) -> Confusion:
        return confusion([r.truth for r in self.scored], [r.called for r in self.scored])

    def per_patient(self) -> Confusion:
        return confusion([p.source.group == "covid" for p in self.patients],
                         [p.result == "positive" for p in self.patients])

    def sweep(self) -> list[dict]:
        return sweep([r.score for r in self.scored], [bool(r.truth) for r in self.scored])

    @property
    def with_dice(self) -> list[ImageResult]:
        return [r for r in self.images if r.dice is not None]

    def as_dict(self) -> dict:
        n = len(self.images)
        dl = self.with_dice
        les = [r for r in dl if not r.mask_empty]
        return {
            "schema": "ctriage.evaluation/1",
            "per_image": {**self.per_image().metrics(), "excluded": sum(r.truth is None for r in self.images),
                          "images": n},
            "per_patient": {**self.per_patient().metrics(), "patients": len(self.patients)},
            "dice": {"mean": mean_or_none([r.dice for r in dl]), "n": len(dl),  # type: ignore[misc]
                     "ci95": _rounded(bootstrap_mean_ci([r.dice for r in dl])),  # type: ignore[misc]
                     "images": [{"image": r.image_id, "dice": round(r.dice, 4)} for r in dl],  # type: ignore[arg-type]
                     "iou_mean": mean_or_none([r.iou for r in dl]),  # type: ignore[misc]
                     "both_empty": sum(bool(r.mask_empty and r.pred_empty) for r in dl),
                     "lesion_mean": mean_or_none([r.dice for r in les]), "lesion_n": len(les)},  # type: ignore[misc]
            "roc_auc": (lambda a: round(a, 4) if a is not None else None)(auc(self.sweep())),
            "threshold": self.threshold, "min_area_px512": self.min_area, "min_score": self.min_score,
            "backend": self.backend, "precision": self.precision, "device": self.device, "bundles": self.bundles,
            "ms_per_slice": round(self.seconds * 1000.0 / n, 2) if n else None,
            "total_s": round(self.seconds, 3),
            "patients": [p.as_dict() for p in self.patients],
            "rejected": [{"patient": p.source.name, **r} for p in self.patients for r in p.rejected],
            "skipped": [{"patient": p.source.name, **r} for p in self.patients for r in p.skipped],
        }


def _rounded(ci: tuple[float, float] | None, digits: int = 4) -> list[float] | None:
    return None if ci is None else [round(ci[0], digits), round(ci[1], digits)]


def paired_dice(data: dict, baseline: dict[str, float]) -> list[tuple[float, float]]:
    """(this Dice, baseline Dice) of every image both evaluations scored; `baseline`: image id → Dice."""
    return [(i["dice"], baseline[i["image"]]) for i in data["dice"]["images"] if i["image"] in baseline]


def spread_words(ci: list[float] | None) -> str:
    """What a paired interval says about a difference, in words."""
    if ci is None:
        return "one paired image: no interval"
    return ("better beyond the images' spread" if ci[0] > 0 else
            "worse beyond the images' spread" if ci[1] < 0 else "within the images' spread")


def compare_dice(data: dict, baseline: dict) -> dict:
    """Mean Dice of `data` minus `baseline` (two evaluation objects) over the images both scored, with the paired
    bootstrap interval: the difference between two bundles on the same images, and how far it can be trusted.
    Raises DatasetError when the baseline is not an evaluation object or shares no image with this one."""
    try:
        if baseline.get("schema") != data["schema"]:
            raise KeyError("schema")
        old = {i["image"]: float(i["dice"]) for i in baseline["dice"]["images"]}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DatasetError(f"the baseline is not a {data['schema']} object with per-image Dice (write it with "
                           "this version's `ctriage evaluate --json` or --report)") from None
    pairs = paired_dice(data, old)
    if not pairs:
        raise DatasetError("the baseline shares no image with a mask with this evaluation: not the same dataset")
    diff = [new - was for new, was in pairs]
    return {"n": len(pairs), "mean_new": mean_or_none([n for n, _ in pairs]),
            "mean_baseline": mean_or_none([b for _, b in pairs]), "difference": mean_or_none(diff),
            "ci95": _rounded(bootstrap_mean_ci(diff)), "better": sum(d > 0 for d in diff),
            "worse": sum(d < 0 for d in diff), "bundles_baseline": baseline.get("bundles")}


# ---------------------------------------------------------------------------------------------- running


def evaluate(root: Path, analyzer, max_tilt_deg: float = 10.0, progress: Callable[[int], None] | None = None,
             on_total: Callable[[int], None] | None = None) -> Evaluation:
    """Run the analyzer over every patient of the dataset and score each image against its mask."""
    patients = find_patients(root)
    found = [discover(p.folder) for p in patients]
    if on_total:
        on_total(sum(len(d) + sum(len(v) for v in im.values()) for d, im in found))
    images: list[ImageResult] = []
    results: list[PatientResult] = []
    total_s = 0.0
    for src, (dicom_files, image_groups) in zip(patients, found):
        res, imgs = _run_patient(src, dicom_files, image_groups, analyzer, max_tilt_deg, progress)
        total_s += res.seconds
        results.append(res)
        images += imgs
    le = analyzer.lesion
    return Evaluation(images, results, analyzer.backend, analyzer.precision, analyzer.device, analyzer.bundles,
                      float(le.threshold), float(le.min_area), total_s, float(le.min_score),
                      analyzer.rule.describe())


def _run_patient(src: PatientSource, dicom_files: list[Path], image_groups: dict[Path, list[Path]], analyzer,
                 max_tilt_deg: float,
                 progress: Callable[[int], None] | None) -> tuple[PatientResult, list[ImageResult]]:
    seconds = 0.0
    runs = []  # (kind, verdict, ordered findings, verdict with the other-findings stage off)
    without = analyzer.rule.but(other_findings=False)
    t0 = time.perf_counter()
    done = analyze_files(dicom_files, analyzer, max_tilt_deg, progress, keep_prob=True)
    rejected = done.rejected
    dangling: list[Path] = []
    walk_files(src.folder, dangling)
    broken = [{"file": str(q), "reason": "broken symbolic link"} for q in sorted(dangling)]
    rejected += broken
    for r in rejected:
        r.pop("series_uid", None)
    if progress and broken:
        progress(len(broken))
    for a in done.series:
        verdict, ordered = analyzer.verdict(a.kept, a.findings)
        rejected += a.rejected
        runs.append(("dicom", verdict, ordered, decide(ordered, without)))
    seconds += time.perf_counter() - t0
    for folder, files in sorted(image_groups.items(), key=lambda kv: natural_key(str(kv[0]))):
        t0 = time.perf_counter()
        slices, bad = image_series(folder, files)
        rejected += bad
        if progress and bad:
            progress(len(bad))
        if not slices:
            seconds += time.perf_counter() - t0
            continue
        findings: list[SliceFinding] = []
        b = max(1, analyzer.config.batch * analyzer.workers)  # every worker busy
        for i in range(0, len(slices), b):
            findings += analyzer.findings(slices[i:i + b], keep_prob=True)
            if progress:
                progress(len(slices[i:i + b]))
        # a crop patient is a handful of slices picked from a scan: no slice count is asked of it
        verdict, ordered = analyzer.verdict(slices, findings, rule=analyzer.rule.but(min_slices=1))
        seconds += time.perf_counter() - t0
        runs.append(("images", verdict, ordered, verdict))  # crops carry no HU: no solid lesions to find
    out: list[ImageResult] = []
    for kind, _, ordered, _ in runs:
        for i, f in enumerate(ordered):
            out.append(_score_image(src, kind, i, f, analyzer))
            f.prob = None  # memory stays flat: only boxes are kept
    result = _patient_verdict(src, runs, [r for r in rejected if not is_document(r["file"], r["reason"])], seconds)
    result.skipped = [r for r in rejected if is_document(r["file"], r["reason"])]
    return result, out


def _score_image(src: PatientSource, kind: str, index: int, f: SliceFinding, analyzer) -> ImageResult:
    le = analyzer.lesion
    h, w = f.shape
    if f.prob_rect is not None and f.prob is not None:
        scale = le.area_scale  # the manifest's: areas are measured as if the slice were scale × scale
        to512 = 1.0 if kind == "images" else (scale / h) * (scale / w)
        px_area = (f.prob_rect.height / f.prob.shape[0]) * (f.prob_rect.width / f.prob.shape[1]) * to512
        score = component_score(f.prob, px_area, le.min_area)
    else:
        score = 0.0
    mpath = src.masks / f"{Path(f.key).stem}.png" if src.masks is not None else None
    if mpath is not None and not mpath.is_file():
        mpath = None
    r = ImageResult(src.name, src.group, f.key, kind, index, f, score, truth=src.group == "covid")
    if mpath is not None:
        m = read_mask(mpath)
        if m.shape != tuple(f.shape):
            raise DatasetError(f"{mpath}: mask is {m.shape[0]}×{m.shape[1]} but its image {Path(f.key).name} is "
                               f"{h}×{w}")
        pred = predicted_mask(f.prob, f.prob_rect, f.shape, le.threshold)
        r.mask, r.mask_empty, r.pred_empty = mpath, not m.any(), not pred.any()
        r.dice, r.iou = dice(pred, m), iou(pred, m)
        if src.group == "covid" and r.mask_empty:
            r.truth = None  # a COVID image without lesion is neither a positive nor a negative
    return r


def _patient_verdict(src: PatientSource, runs: list, rejected: list[dict], seconds: float) -> PatientResult:
    slices = sum(v.slices for _, v, _, _ in runs)
    lesion = sum(v.lesion_slices for _, v, _, _ in runs)
    if not runs:
        why = f"no usable slices ({len(rejected)} file(s) rejected)" if rejected else "no slices"
        return PatientResult(src, "indeterminate", why, None, 0, 0, 0, rejected, seconds)
    # the study-level function the appliance publishes from: a patient's call is the study verdict of its runs
    v, lead = study_verdict([SeriesSummary(str(i), run_v) for i, (_, run_v, _, _) in enumerate(runs)])
    off, _ = study_verdict([SeriesSummary(str(i), run_off) for i, (_, _, _, run_off) in enumerate(runs)])
    return PatientResult(src, v.result, None if v.result == "positive" else v.reason,
                         v.evidence.as_dict() if v.evidence else None, len(runs), slices, lesion, rejected, seconds,
                         focal=v.focal.as_dict() if v.focal else None, grade=v.grade, others=v.others,
                         without_others=off.result, acquisition=v.acquisition,
                         deciding=deciding_slices(v, runs[int(lead.series_key)][2]))


def deciding_slices(v, ordered: list[SliceFinding]) -> list[dict]:
    """The slices that decided a patient's call, one per finding, for people to look at: the run that fired (a
    positive) or the single focal lesion (a negative naming one) — each at its slice with the largest box in its
    quadrant — and every solid nodule or mass named (its slice with the largest box). [{"key", "index", "what"}]."""
    out: list[dict] = []
    run_entry = None
    for run, what in ((v.evidence, "the run that fired"), (v.focal, "the single focal lesion")):
        if run is not None:
            i = largest_box_slice(ordered, run.first_slice, run.last_slice, run.quadrant)
            run_entry = {"key": ordered[i].key, "index": i,
                         "what": f"{what}: slices {run.first_slice + 1}–{run.last_slice + 1}, image {run.quadrant}"}
            out.append(run_entry)
    for o in v.others:
        first, last = int(o["first_slice"]), int(o["last_slice"])
        what = f"{o['text']}: slices {first + 1}–{last + 1}"
        if run_entry is not None and v.focal is not None and (first, last) == (v.focal.first_slice, v.focal.last_slice):
            run_entry["what"] = what  # the focal lesion named a mass: one picture, named so
            continue
        i = largest_box_slice(ordered, first, last, None)
        same = [d for d in out if d["index"] == i]
        if same:
            same[0]["what"] += f"; {what}"
        else:
            out.append({"key": ordered[i].key, "index": i, "what": what})
    return out
