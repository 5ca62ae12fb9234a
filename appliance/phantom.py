"""A synthetic chest CT phantom written as a DICOM series — for the demo, the self-tests and the tests.

It is synthetic: ellipses for body, lungs, heart and spine, random vessels, and (optionally) patchy ground-glass
opacities in one quadrant over consecutive slices. It resembles a chest CT closely enough to exercise every
stage; it is not a patient and says so in its headers (PatientName "PHANTOM^SYNTHETIC").
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage as ndi

from appliance.jpeg_lossless import JPEG_LOSSLESS_SV1
from appliance.jpeg_lossless import encode as encode_jpeg_lossless


@dataclass
class PhantomSpec:
    slices: int = 60
    size: int = 512
    spacing_mm: float = 0.7
    thickness_mm: float = 5.0
    lesion: bool = True
    lesion_side: str = "right"  # image side (display): "right" = patient's left
    lesion_slices: tuple[float, float] = (0.45, 0.75)  # fraction of the series (head → feet) with lesions
    # a second, smaller focus: anterior in the other lung over these fractions (COVID-19 pneumonia is multifocal;
    # None: one focus only, like a tumour, which the case rule calls negative with a note)
    second_focus: tuple[float, float] | None = (0.52, 0.68)
    seed: int = 7
    patient_name: str = "PHANTOM^SYNTHETIC"
    patient_id: str = "SYNTH-0001"


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - cy) / max(ry, 1e-3)) ** 2 + ((x - cx) / max(rx, 1e-3)) ** 2 <= 1.0


def phantom_slice(spec: PhantomSpec, k: int, rng: np.random.Generator) -> np.ndarray:
    """HU of slice k (0 = most superior), display orientation."""
    n, s = spec.slices, spec.size
    t = (k + 0.5) / n  # 0 head … 1 feet
    hu = np.full((s, s), -1000.0, np.float32)
    c = s / 2
    body = _ellipse(hu.shape, c, c, s * 0.27, s * 0.36)
    hu[body] = -90.0  # fat
    hu[_ellipse(hu.shape, c, c, s * 0.25, s * 0.34)] = 40.0  # muscle / soft tissue
    # lungs exist for t in [0.1, 0.9], largest mid-series
    prof = np.sin(np.clip((t - 0.1) / 0.8, 0, 1) * np.pi)
    lung = np.zeros_like(body)
    if prof > 0.15:
        for side in (-1, 1):
            lung |= _ellipse(hu.shape, c - s * 0.01, c + side * s * 0.155, s * 0.2 * prof ** 0.5, s * 0.12 * prof ** 0.5)
        hu[lung] = -860.0
        # vessels: small dense dots, denser near the hila
        m = int(160 * prof)
        ys = rng.normal(c, s * 0.12, m)
        xs = c + rng.choice([-1, 1], m) * np.abs(rng.normal(s * 0.1, s * 0.06, m))
        for y, x, r in zip(ys, xs, rng.uniform(1.0, 3.5, m)):
            v = _ellipse(hu.shape, y, x, r, r) & lung
            hu[v] = 30.0
        # heart / mediastinum between the lungs
        hu[_ellipse(hu.shape, c + s * 0.03, c + s * 0.02, s * 0.11 * prof ** 0.3, s * 0.09 * prof ** 0.3)] = 45.0
    else:
        hu[_ellipse(hu.shape, c - s * 0.02, c + s * 0.05, s * 0.16, s * 0.2)] = 55.0  # liver / abdomen organs
    # spine and ribs
    hu[_ellipse(hu.shape, c + s * 0.2, c, s * 0.045, s * 0.045)] = 450.0
    ring = _ellipse(hu.shape, c, c, s * 0.255, s * 0.345) & ~_ellipse(hu.shape, c, c, s * 0.245, s * 0.335)
    ang = np.arctan2(*np.mgrid[-c:c, -c:c])
    hu[ring & (np.sin(ang * 9) > 0.5)] = 400.0
    # table
    hu[int(c + s * 0.32):int(c + s * 0.33), int(s * 0.1):int(s * 0.9)] = 200.0
    lo, hi = spec.lesion_slices
    side = 1 if spec.lesion_side == "right" else -1
    if spec.lesion and lung.any() and lo <= t <= hi:
        # patchy ground-glass opacity, subpleural and posterior, vessels still visible through it
        hu = _ggo(hu, lung, c + s * 0.1, c + side * s * 0.22, s, rng, 7)
    if spec.lesion and spec.second_focus and lung.any() and spec.second_focus[0] <= t <= spec.second_focus[1]:
        # its own random stream, so the first focus and the texture are the same with or without it
        hu = _ggo(hu, lung, c - s * 0.08, c - side * s * 0.2, s, np.random.default_rng((spec.seed, k)), 4)
    if lung.any():  # parenchymal texture
        hu += ndi.gaussian_filter(rng.normal(0, 1, hu.shape).astype(np.float32), 1.2) * 40.0 * lung
    hu += rng.normal(0, 12, hu.shape).astype(np.float32) * body
    return hu


def _ggo(hu: np.ndarray, lung: np.ndarray, cy: float, cx: float, s: int, rng: np.random.Generator,
         blobs: int) -> np.ndarray:
    """A patch of ground glass: overlapping ellipses about (cy, cx), smoothed, with a mottled density."""
    env = np.zeros_like(hu)
    for _ in range(blobs):
        y, x = cy + rng.normal(0, s * 0.04), cx + rng.normal(0, s * 0.03)
        r = rng.uniform(s * 0.025, s * 0.055)
        env += _ellipse(hu.shape, y, x, r, r * 1.3)
    env = ndi.gaussian_filter((env > 0).astype(np.float32), 4.0) * lung
    patch = ndi.gaussian_filter(rng.normal(0, 1, hu.shape).astype(np.float32), 4.0)
    patch = (patch - patch.mean()) / (patch.std() + 1e-6)
    ggo = env * np.clip(0.55 + 0.45 * patch, 0.0, 1.0)
    lesion = -860.0 + ggo * rng.uniform(380.0, 520.0)
    return np.where(env > 0.15, np.maximum(hu, lesion), hu)


def phantom_series(spec: PhantomSpec) -> list[np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    return [phantom_slice(spec, k, rng) for k in range(spec.slices)]


def ct_slice_dataset(hu: np.ndarray, *, study_uid: str, series_uid: str, instance: int, z_mm: float,
                     spacing_mm: tuple[float, float], thickness_mm: float, description: str,
                     transfer_syntax: str = ExplicitVRLittleEndian, **extra: object) -> Dataset:
    """One axial CT Image Storage dataset (12-bit stored, intercept -1024) from an HU slice in display order."""
    stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.InstanceNumber = instance
    ds.SeriesDescription = description
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rows, cols = stored.shape
    ds.ImagePositionPatient = [-cols * spacing_mm[1] / 2, -rows * spacing_mm[0] / 2, z_mm]
    ds.SliceLocation = z_mm
    ds.SliceThickness = thickness_mm
    ds.PixelSpacing = [spacing_mm[0], spacing_mm[1]]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = stored.tobytes()
    if transfer_syntax == JPEG_LOSSLESS_SV1:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([encode_jpeg_lossless(stored, precision=12)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, stored)
    return ds


def write_phantom(out_dir: str | Path, spec: PhantomSpec | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
                  study_uid: str | None = None, series_number: int = 1) -> list[Path]:
    """Write the phantom as single-frame CT DICOM files; returns the paths (head → feet)."""
    spec = spec or PhantomSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    now = _dt.datetime.now()
    paths = []
    for k, hu in enumerate(phantom_series(spec)):
        ds = ct_slice_dataset(
            hu, study_uid=study_uid, series_uid=series_uid, instance=k + 1, z_mm=-k * spec.thickness_mm,
            spacing_mm=(spec.spacing_mm, spec.spacing_mm), thickness_mm=spec.thickness_mm,
            description="SYNTHETIC PHANTOM - NOT A PATIENT", transfer_syntax=transfer_syntax,
            Manufacturer="ctriage synthetic phantom", PatientName=spec.patient_name, PatientID=spec.patient_id,
            PatientBirthDate="19700101", AccessionNumber="SYNTH-ACC-1", FrameOfReferenceUID=frame_uid,
            StudyDate=now.strftime("%Y%m%d"), SeriesDate=now.strftime("%Y%m%d"), StudyTime=now.strftime("%H%M%S"),
            SeriesTime=now.strftime("%H%M%S"), SeriesNumber=series_number, WindowCenter=-600, WindowWidth=1500)
        p = out / f"IM{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
