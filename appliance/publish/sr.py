"""DICOM results for PACS: a Structured Report of the verdict (TID 1500, in the spirit of IHE AI Results) and an
optional Secondary Capture key image with the boxes burned in. Pure: builds pydicom datasets, no network.

The SR joins the source study (StudyInstanceUID and patient/study modules copied from the source, so PACS files it
with the images), carries the result, state and evidence as coded evaluations and measurements, each lesion box as
an image region (SCOORD POLYLINE) on the source slice it was found on, and the models (name, version, sha256) as
the algorithm identification. Codes: SNOMED CT and DCM where they exist, the private scheme 99CTRIAGE otherwise.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from appliance import __version__
from appliance.publish.overlays import _font

MANUFACTURER = "ctriage"
SCHEME = "99CTRIAGE"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

#: Patient, study and equipment-independent series elements copied from the source into the results.
COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
          "PatientAge", "OtherPatientIDsSequence", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "StudyDescription",
          "SeriesInstanceUID", "SeriesNumber", "Modality", "FrameOfReferenceUID", "InstitutionName")
#: Type 2 elements highdicom reads from the first evidence item: present (maybe empty) in every header.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


TRIAGE_RESULT = _code("TRIAGE-RESULT", "COVID-19 pneumonia triage result")
VERDICT_STATE = _code("VERDICT-STATE", "Verdict state")
EVIDENCE_QUADRANT = _code("EVIDENCE-QUADRANT", "Quadrant of the evidence run")
LESION_QUADRANT = _code("LESION-QUADRANT", "Lesion quadrant")
LESION_SCORE = _code("LESION-SCORE", "Lesion probability (maximum)")
RUN_LENGTH = _code("RUN-LENGTH", "Consecutive slices with lesion in one quadrant")
FIRST_SLICE = _code("RUN-FIRST", "First slice of the evidence run (1-based, series order)")
LAST_SLICE = _code("RUN-LAST", "Last slice of the evidence run (1-based, series order)")
SLICES = _code("SLICES", "Slices analysed")
LUNG_SLICES = _code("LUNG-SLICES", "Slices with lung")
LESION_SLICES = _code("LESION-SLICES", "Slices with lesion")
FOCI = _code("FOCI", "Separate lesion foci spanning a qualifying run")
FOCAL_QUADRANT = _code("FOCAL-QUADRANT", "Quadrant of a single focal lesion (not the COVID-19 pattern)")
FOCAL_RUN = _code("FOCAL-RUN", "Consecutive slices of the single focal lesion")
FOCAL_FIRST = _code("FOCAL-FIRST", "First slice of the single focal lesion (1-based)")
FOCAL_LAST = _code("FOCAL-LAST", "Last slice of the single focal lesion (1-based)")
STATES = {"final": _code("FINAL", "Final"), "provisional": _code("PROVISIONAL", "Provisional"),
          "corrected": _code("CORRECTED", "Final, corrected: replaces an earlier final result")}
RESULTS = {"positive": codes.SCT.Positive, "negative": codes.SCT.Negative, "indeterminate": codes.SCT.Indeterminate}
QUADRANT_CODES = {
    "upper-left": _code("UL", "upper-left (anterior, patient right)"),
    "upper-right": _code("UR", "upper-right (anterior, patient left)"),
    "lower-left": _code("LL", "lower-left (posterior, patient right)"),
    "lower-right": _code("LR", "lower-right (posterior, patient left)"),
}
PATTERN = _code("PATTERN", "Viral pneumonia pattern (RSNA category), not a diagnosis")
PATTERNS = {"typical": _code("TYPICAL", "Typical appearance"),
            "indeterminate": _code("INDETERMINATE", "Indeterminate appearance"),
            "atypical": _code("ATYPICAL", "Atypical appearance")}
SEVERITY = _code("SEVERITY", "Severity score, 25-point style from lung zones")
EXTENT = _code("EXTENT", "Lung volume involved")
OTHER_DIAMETER = _code("SOLID-DIAMETER", "Solid nodule or mass diameter (its halo did not count)")
IMAGE_NOISE = _code("IMAGE-NOISE", "Image noise at the lesion model's input (lung-window scale)")
NOISY_SCAN = _code("NOISY-SCAN", "Noisy acquisition: lesion boxes less reliable")
ACQUISITION = _code("ACQUISITION", "Acquisition quality")
SCORE_UNIT = hd.sr.CodedConcept("{score}", "UCUM", "score")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
MM = hd.sr.CodedConcept("mm", "UCUM", "millimetre")
COVID19 = hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
SLICES_UNIT = hd.sr.CodedConcept("{slices}", "UCUM", "slices")
UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")


class ResultError(ValueError):
    """The verdict and the source do not fit together (e.g. no source instances)."""


@dataclass(frozen=True)
class SourceInstance:
    """One analysed slice: what the SR needs to reference it and to map boxes into its stored pixel grid."""

    sop_class_uid: str
    sop_instance_uid: str
    rows: int = 0
    columns: int = 0
    orientation: tuple[float, ...] = ()  # ImageOrientationPatient

    def __post_init__(self) -> None:
        object.__setattr__(self, "orientation", tuple(float(v) for v in self.orientation))

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SourceInstance:
        iop: tuple[float, ...] = ()
        try:
            iop = tuple(float(v) for v in ds.get("ImageOrientationPatient") or ())
        except (TypeError, ValueError):
            pass
        return cls(str(ds.get("SOPClassUID", "") or CTImageStorage), str(ds.SOPInstanceUID),
                   int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), iop if len(iop) == 6 else ())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SourceInstance:
        return cls.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))

    def as_list(self) -> list:
        """JSON-able; SourceInstance(*x) restores it."""
        return [self.sop_class_uid, self.sop_instance_uid, self.rows, self.columns, list(self.orientation)]


@dataclass
class SourceSeries:
    """The analysed series: patient/study header copied from its first instance, and its instances in series order.

    `instances[i]` is slice i of the verdict (evidence first/last slice, key slice indices): the same order the
    analyzer used (by position along the slice normal, rejected files left out).
    """

    header: Dataset
    instances: list[SourceInstance] = field(default_factory=list)

    @property
    def study_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))

    @staticmethod
    def header_of(ds: Dataset) -> Dataset:
        """The patient/study/series elements of a source instance that results copy (see COPIED)."""
        if "StudyInstanceUID" not in ds:
            raise ResultError("the source instance has no StudyInstanceUID")
        header = Dataset()
        for k in COPIED:
            if k in ds:
                header[k] = ds[k]
        for k in _TYPE2:
            if k not in header:
                setattr(header, k, "")
        return header

    @classmethod
    def from_datasets(cls, datasets: Iterable[Dataset]) -> SourceSeries:
        header, instances = None, []
        for ds in datasets:
            header = header if header is not None else cls.header_of(ds)
            instances.append(SourceInstance.from_dataset(ds))
        if header is None:
            raise ResultError("no source instances")
        return cls(header, instances)

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike]) -> SourceSeries:
        """Headers only (pixel data is not read); paths in series order."""
        return cls.from_datasets(pydicom.dcmread(p, stop_before_pixels=True) for p in paths)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (to keep it in a store until the final verdict)."""
        return {"header": self.header.to_json_dict(), "instances": [i.as_list() for i in self.instances]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceSeries:
        return cls(Dataset.from_json(d["header"]),
                   [SourceInstance(*i) for i in d["instances"]])

    def evidence_datasets(self, indices: Iterable[int] | None = None) -> list[Dataset]:
        """Minimal datasets (header + SOP class/instance) of the instances, as highdicom takes evidence."""
        out = []
        idx = range(len(self.instances)) if indices is None else indices
        for i in idx:
            ds = Dataset()
            ds.update(self.header)
            ds.SOPClassUID = self.instances[i].sop_class_uid
            ds.SOPInstanceUID = self.instances[i].sop_instance_uid
            out.append(ds)
        return out


def display_box_to_stored(box: Sequence[float], inst: SourceInstance) -> np.ndarray | None:
    """A box [y0, x0, y1, x1] normalised to the display-oriented slice → closed polyline (column, row) in the
    stored pixel grid of the source image (undoing the reader's transpose/flips). None without geometry."""
    if not (inst.rows and inst.columns and len(inst.orientation) == 6):
        return None
    row_dir, col_dir = np.asarray(inst.orientation[:3]), np.asarray(inst.orientation[3:])
    transposed = abs(row_dir[1]) > abs(row_dir[0])
    if transposed:
        row_dir, col_dir = col_dir, row_dir
    h, w = (inst.columns, inst.rows) if transposed else (inst.rows, inst.columns)  # display shape
    y0, x0, y1, x1 = (float(v) for v in box)
    pts = []
    for y, x in ((y0, x0), (y0, x1), (y1, x1), (y1, x0), (y0, x0)):
        yd, xd = y * h, x * w  # display pixel coordinates (edges)
        if col_dir[1] < 0:
            yd = h - yd
        if row_dir[0] < 0:
            xd = w - xd
        r, c = (xd, yd) if transposed else (yd, xd)
        pts.append((c, r))
    return np.asarray(pts, dtype=np.float32)


def _algorithm(verdict: dict[str, Any]) -> hd.sr.AlgorithmIdentification:
    bundles = verdict.get("bundles") or []
    main = next((b for b in bundles if "lesion" in str(b.get("name", ""))), bundles[-1] if bundles else None)
    params = [f"model {b.get('name')} {b.get('version')} sha256:{b.get('sha256', '')}" for b in bundles]
    params.append(f"ctriage {__version__}, backend {verdict.get('backend', '')} on {verdict.get('device_type', '')}")
    name = str(main.get("name")) if main else "ctriage"
    version = str(main.get("version")) if main else __version__
    return hd.sr.AlgorithmIdentification(name=name[:64], version=version[:64], parameters=[p[:1024] for p in params],
                                         manufacturer=MANUFACTURER)


def _device_uid(device_id: str) -> str:
    return generate_uid(entropy_srcs=["ctriage-device", device_id])


def result_uids(verdict: dict[str, Any], source: SourceSeries, kind: str, device_id: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of a result: derived from the verdict (device, source series, state, result,
    creation time) so that submitting the same verdict again yields the same instance, which PACS de-duplicates;
    random when the verdict has no creation time."""
    created = str(verdict.get("created", "") or "")
    if not created:
        return generate_uid(), generate_uid()
    base = ["ctriage", device_id, source.series_uid, str(verdict.get("state")), str(verdict.get("result")), created]
    return generate_uid(entropy_srcs=base + [kind, "series"]), generate_uid(entropy_srcs=base + [kind, "instance"])


def build_sr(verdict: dict[str, Any], source: SourceSeries, key_slices: Sequence[dict[str, Any]] | None = None, *,
             device_id: str = "", max_regions: int = 32, institution_name: str | None = None,
             uids: tuple[str, str] | None = None) -> Dataset:
    """Comprehensive SR (TID 1500) of a verdict payload (appliance.publish.messages.verdict_payload).

    key_slices: the overlay's key slices (series index, boxes normalised to the display-oriented slice); each box
    becomes an image region on its source instance (at most max_regions, best scores first).
    """
    if not source.instances:
        raise ResultError("the source series has no instances to reference")
    result = str(verdict.get("result", "indeterminate"))
    state = str(verdict.get("state", "final"))
    if result not in RESULTS or state not in STATES:
        raise ResultError(f"unknown result/state {result!r}/{state!r}")
    algorithm = _algorithm(verdict)
    device = device_id or str(verdict.get("device", "")) or "ctriage"
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(device), name=device[:64], manufacturer_name=MANUFACTURER,
            model_name=f"ctriage {__version__}"[:64]))
    n = len(source.instances)
    ev = verdict.get("evidence") or None
    focal = verdict.get("focal") or None  # a negative's single lesion focus, named for the radiologist
    counts = verdict.get("counts") or {}
    evaluations = [hd.sr.QualitativeEvaluation(TRIAGE_RESULT, RESULTS[result]),
                   hd.sr.QualitativeEvaluation(VERDICT_STATE, STATES[state])]
    measurements = []
    run_images: list[int] = []
    for run, (quad, length, first_c, last_c) in ((ev, (EVIDENCE_QUADRANT, RUN_LENGTH, FIRST_SLICE, LAST_SLICE)),
                                                (focal, (FOCAL_QUADRANT, FOCAL_RUN, FOCAL_FIRST, FOCAL_LAST))):
        if not run or run.get("quadrant") not in QUADRANT_CODES:
            continue
        evaluations.append(hd.sr.QualitativeEvaluation(quad, QUADRANT_CODES[run["quadrant"]]))
        first, last = int(run["first_slice"]), int(run["last_slice"])
        measurements += [hd.sr.Measurement(length, float(run["run"]), SLICES_UNIT),
                         hd.sr.Measurement(first_c, float(first + 1), SLICES_UNIT),
                         hd.sr.Measurement(last_c, float(last + 1), SLICES_UNIT)]
        run_images = [i for i in range(first, last + 1) if 0 <= i < n]
    g = verdict.get("grade") or None
    if g and result == "positive" and g.get("category") in PATTERNS:  # the pattern of a positive, graded
        evaluations.append(hd.sr.QualitativeEvaluation(PATTERN, PATTERNS[g["category"]]))
        measurements.append(hd.sr.Measurement(SEVERITY, float(g.get("severity", 0)), SCORE_UNIT))
        measurements.append(hd.sr.Measurement(EXTENT, float((g.get("extent") or {}).get("total", 0.0)), PERCENT))
    acq = verdict.get("acquisition") or None
    if acq and isinstance(acq.get("noise"), (int, float)):  # the series' noise; a noisy scan is said so
        measurements.append(hd.sr.Measurement(IMAGE_NOISE, float(acq["noise"]), UNITY))
        if acq.get("noisy"):
            evaluations.append(hd.sr.QualitativeEvaluation(ACQUISITION, NOISY_SCAN))
    for concept, key in ((SLICES, "slices"), (LUNG_SLICES, "lung_slices"), (LESION_SLICES, "lesion_slices"),
                         (FOCI, "foci")):
        if counts.get(key) is not None:
            measurements.append(hd.sr.Measurement(concept, float(counts[key]), SLICES_UNIT))
    sources = [hd.sr.SourceImageForMeasurementGroup(source.instances[i].sop_class_uid,
                                                    source.instances[i].sop_instance_uid) for i in run_images[:64]]
    groups: list[Any] = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="ctriage verdict"),
        finding_type=COVID19, algorithm_id=algorithm, measurements=measurements or None,
        qualitative_evaluations=evaluations, source_images=sources or None)]
    for k, o in enumerate(verdict.get("others") or []):  # solid nodules and masses named, not the COVID-19 pattern
        first, last = int(o["first_slice"]), int(o["last_slice"])
        srcs = [hd.sr.SourceImageForMeasurementGroup(source.instances[i].sop_class_uid,
                                                     source.instances[i].sop_instance_uid)
                for i in range(first, last + 1) if 0 <= i < n][:64]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"other finding {k + 1}"[:64]),
            finding_type=codes.SCT.Mass if o.get("kind") == "mass" else codes.SCT.Nodule, algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(OTHER_DIAMETER, float(o["diameter_mm"]), MM)],
            source_images=srcs or None))
    regions = []
    for ks in key_slices or []:
        i = int(ks.get("index", -1))
        if not 0 <= i < n:
            continue
        for b in ks.get("boxes") or []:
            regions.append((float(b.get("score", 0.0)), i, b))
    regions.sort(key=lambda t: -t[0])
    for k, (score, i, b) in enumerate(regions[:max_regions]):
        inst = source.instances[i]
        pts = display_box_to_stored(b["box"], inst)
        if pts is None:
            continue
        quadrant = b.get("quadrant")
        site = hd.sr.FindingSite(codes.SCT.Lung, laterality=codes.SCT.Right if str(quadrant).endswith("left")
                                 else codes.SCT.Left)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                         identifier=f"lesion {k + 1} slice {i + 1}"),
            referenced_region=hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, pts,
                                                hd.sr.SourceImageForRegion(inst.sop_class_uid, inst.sop_instance_uid)),
            finding_type=codes.SCT.Lesion, algorithm_id=algorithm, finding_sites=[site],
            measurements=[hd.sr.Measurement(LESION_SCORE, round(score, 4), UNITY)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(LESION_QUADRANT, QUADRANT_CODES[quadrant])]
            if quadrant in QUADRANT_CODES else None))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=CT_CHEST, imaging_measurements=groups,
                                     title=codes.DCM.ImagingMeasurementReport)
    final = state in ("final", "corrected")
    series_uid, sop_uid = uids or result_uids(verdict, source, "sr", device)
    sr = hd.sr.ComprehensiveSR(
        evidence=source.evidence_datasets(), content=report[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        is_complete=final, is_final=final, institution_name=institution_name,
        series_description=f"ctriage AI result - {NOT_FOR_DIAGNOSIS}"[:64],
        manufacturer_model_name="ctriage", software_versions=__version__, device_serial_number=device[:64],
        coding_schemes=[CodingSchemeIdentificationItem(SCHEME, name="ctriage triage codes",
                                                       responsible_organization=MANUFACTURER)])
    sr.ContentDescription = "COVID-19 pneumonia triage (AI), " + NOT_FOR_DIAGNOSIS
    return sr


def burn_banner(img: Image.Image, text: str = NOT_FOR_DIAGNOSIS) -> Image.Image:
    """The image below a black band with the text burned in (the band is added: nothing of the image is covered)."""
    src = img.convert("RGB")
    font = _font(max(12, src.width // 26))
    band = font.size + 10
    out = Image.new("RGB", (src.width, src.height + band), (0, 0, 0))
    out.paste(src, (0, band))
    ImageDraw.Draw(out).text((6, 4), text, fill=(255, 255, 0), font=font)
    return out


def build_key_image(image: Image.Image | bytes, source: SourceSeries, index: int, verdict: dict[str, Any], *,
                    device_id: str = "", uids: tuple[str, str] | None = None) -> Dataset:
    """Secondary Capture of a rendered key image (overlays.render), "NOT FOR DIAGNOSTIC USE" burned in and said in
    ImageComments; it references the source slice it shows and joins the source study."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    img = burn_banner(image)
    pixels = np.asarray(img, dtype=np.uint8)
    ref = source.evidence_datasets([index] if 0 <= index < len(source.instances) else [0])[0]
    series_uid, sop_uid = uids or result_uids(verdict, source, f"key-image-{index}",
                                              device_id or str(verdict.get("device", "")) or "ctriage")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, sop_instance_uid=sop_uid,
        series_number=SC_SERIES_NUMBER, instance_number=1, manufacturer=MANUFACTURER, patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian)
    result = str(verdict.get("result", "")).upper()
    ev = verdict.get("evidence") or {}
    where = f", {ev.get('quadrant')} slices {int(ev['first_slice']) + 1}-{int(ev['last_slice']) + 1}" if ev else ""
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. ctriage triage aid: {result}{where}"[:10240]
    sc.SeriesDescription = f"ctriage key image - {NOT_FOR_DIAGNOSIS}"[:64]
    sc.DerivationDescription = "lung window with lesion boxes drawn by ctriage"
    sc.ConversionType = "WSD"
    sc.ManufacturerModelName, sc.SoftwareVersions = "ctriage", __version__
    if device_id:
        sc.DeviceSerialNumber = device_id[:64]
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
    sc.SourceImageSequence = [item]
    return sc

