"""DICOM file → SliceImage: acceptance checks, HU, display orientation.

Accepted: CT (by Modality, or by SOP class when Modality is absent), one frame, axial within `max_tilt_deg`,
not a localizer, not a secondary capture / structured report / dose object, 16-bit (or 12-bit) stored values
with a Hounsfield rescale. Everything else raises `Rejected` with a specific, human-readable reason.
Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) are decoded by the pylibjpeg plugins.
Parsing the file: appliance.ingest.dicom_file; whether it is complete (not cut short): appliance.ingest.completeness.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pydicom

from appliance.domain import SliceImage
from appliance.ingest.completeness import check_not_cut_short
from appliance.ingest.dicom_file import Rejected, read_dataset
from appliance.ingest.jpeg_decoder import decode_pixels

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
HU_FLOOR = -1024.0

#: SOP classes we recognise and refuse, with the reason given.
REFUSED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture image (a screenshot, not CT data)",
    "1.2.840.10008.5.1.4.1.1.7.1": "secondary capture image (a screenshot, not CT data)",
    "1.2.840.10008.5.1.4.1.1.7.2": "secondary capture image (a screenshot, not CT data)",
    "1.2.840.10008.5.1.4.1.1.7.3": "secondary capture image (a screenshot, not CT data)",
    "1.2.840.10008.5.1.4.1.1.7.4": "secondary capture image (a screenshot, not CT data)",
    "1.2.840.10008.5.1.4.1.1.88.67": "radiation dose structured report, not an image",
    "1.2.840.10008.5.1.4.1.1.88.22": "structured report, not an image",
    "1.2.840.10008.5.1.4.1.1.88.33": "structured report, not an image",
    "1.2.840.10008.5.1.4.1.1.88.11": "structured report, not an image",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF, not an image",
    "1.2.840.10008.5.1.4.1.1.11.1": "presentation state, not an image",
    "1.2.840.10008.5.1.4.1.1.66": "raw data, not an image",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT dose, not a CT image",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set, not an image",
}


def _floats(value, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def check_header(ds: pydicom.Dataset, max_tilt_deg: float = 10.0) -> None:
    """Raise Rejected unless the header describes a single-frame axial CT slice with HU values."""
    sop = str(ds.get("SOPClassUID", "") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if sop in REFUSED_SOP_CLASSES:
        raise Rejected(REFUSED_SOP_CLASSES[sop])
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality != "CT":
        raise Rejected(f"modality {modality}, not CT")
    if not modality and sop not in (CT_IMAGE_STORAGE, ENHANCED_CT_STORAGE):
        raise Rejected("no Modality and not a CT SOP class: cannot tell this is CT")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise Rejected("no pixel data (not an image)")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type or "TOPOGRAM" in " ".join(image_type):
        raise Rejected("localizer (scout/topogram) image, not an axial slice")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or sop == ENHANCED_CT_STORAGE:
        raise Rejected(f"multi-frame image ({frames} frames, Enhanced CT): export as single-frame CT slices")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise Rejected("colour image (SamplesPerPixel > 1), not CT grey values")
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits == 8:
        raise Rejected("8-bit pixels without Hounsfield units (a screen capture, not diagnostic CT data)")
    if bits not in (16, 32):
        raise Rejected(f"unsupported BitsAllocated {bits}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 64 or cols < 64:
        raise Rejected(f"image too small ({rows}x{cols}) for chest CT analysis")
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is None:
        raise Rejected("no ImageOrientationPatient: cannot confirm an axial slice")
    normal = _cross(iop[:3], iop[3:])
    norm = math.sqrt(sum(v * v for v in normal))
    if norm < 0.5:
        raise Rejected("invalid ImageOrientationPatient (row and column directions not orthogonal)")
    tilt = math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))
    if tilt > max_tilt_deg:
        kind = "coronal" if abs(normal[1]) > abs(normal[0]) else "sagittal"
        if tilt < 45:
            raise Rejected(f"slice plane tilted {tilt:.1f}° from axial (gantry tilt or oblique), limit {max_tilt_deg:g}°")
        raise Rejected(f"not axial: {kind} plane ({tilt:.0f}° from axial)")


def _cross(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """3-vector cross product in plain floats (numpy's costs ~50 µs for three numbers, twice per file)."""
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _unit_normal(iop: list[float]) -> tuple[float, float, float]:
    n = _cross(iop[:3], iop[3:])
    norm = math.sqrt(sum(v * v for v in n))
    sign = -1.0 if n[2] < 0 else 1.0
    return (sign * n[0] / norm, sign * n[1] / norm, sign * n[2] / norm)


def slice_normal(iop: list[float]) -> np.ndarray:
    """Unit slice normal pointing to the patient's head (+z in DICOM LPS)."""
    return np.array(_unit_normal(iop))


def to_display(arr: np.ndarray, iop: list[float]) -> np.ndarray:
    """Reorient pixels so columns run patient right→left (+x LPS) and rows anterior→posterior (+y LPS)."""
    row_dir = np.asarray(iop[:3])  # direction of increasing column index
    col_dir = np.asarray(iop[3:])  # direction of increasing row index
    if abs(row_dir[1]) > abs(row_dir[0]):  # columns run along y: transpose
        arr = arr.T
        row_dir, col_dir = col_dir, row_dir
    if row_dir[0] < 0:
        arr = arr[:, ::-1]
    if col_dir[1] < 0:
        arr = arr[::-1, :]
    return np.ascontiguousarray(arr)


def _check_pixel_length(ds: pydicom.Dataset) -> None:
    """Uncompressed pixel data must be exactly Rows × Columns × BitsAllocated / 8 bytes (plus an even pad)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or getattr(ts, "is_compressed", False) or "PixelData" not in ds:
        return
    want = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    got = len(ds.PixelData)
    if got not in (want, want + 1):
        raise Rejected(f"pixel data is {got} bytes, Rows × Columns needs {want}: header and pixels disagree")


def hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values → HU (float32), padding and anything below -1024 clamped to -1024."""
    _check_pixel_length(ds)
    try:
        raw = decode_pixels(ds)
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts)) if ts else "unknown transfer syntax"
        raise Rejected(f"pixel data could not be decoded ({name}): {type(e).__name__}: {e}") from None
    if raw.ndim != 2:
        raise Rejected(f"pixel array has {raw.ndim} dimensions, expected a 2-D slice")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pad = ds.get("PixelPaddingValue")
    hu = raw.astype(np.float32)
    if pad is not None:
        pad_mask = raw == int(pad)
        hu *= slope
        hu += intercept
        hu[pad_mask] = HU_FLOOR
    else:
        hu *= slope
        hu += intercept
    np.maximum(hu, HU_FLOOR, out=hu)
    if not np.isfinite(hu).all():
        raise Rejected("pixel data contains non-finite values")
    return hu


#: what pydicom raises for a value it parsed that makes no sense (text in a number, a wrong multiplicity …)
VALUE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)


def read_slice(path: str | os.PathLike, max_tilt_deg: float = 10.0, with_pixels: bool = True) -> SliceImage:
    """Read and check one file; raise Rejected with the reason when it is not usable.

    with_pixels=False reads the header only (pixel data stays on disk; `load_pixels` decodes it later).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise Rejected(f"cannot read file: {e.strerror}") from None
    if size == 0:
        raise Rejected("empty file")
    ds = read_dataset(p, defer=not with_pixels)
    check_not_cut_short(ds, size, p)
    try:
        return from_dataset(ds, key=str(p), max_tilt_deg=max_tilt_deg, with_pixels=with_pixels)
    except Rejected:
        raise
    except VALUE_ERRORS as e:
        # a header value pydicom parsed but that makes no sense (text in a number, a wrong multiplicity …)
        raise Rejected(f"malformed DICOM header: {type(e).__name__}: {str(e)[:160]}") from None


def load_pixels(img: SliceImage, max_tilt_deg: float = 10.0) -> SliceImage:
    """Decode the pixel data of a header-only SliceImage read from a file (sets img.hu).

    Uses the header parsed by the header-only read (its pixel data was left on disk), so each file is parsed
    once; without it (a SliceImage made elsewhere) the file is read again.
    """
    ds, img.source = img.source, None
    if ds is None:
        img.hu = read_slice(img.key, max_tilt_deg=max_tilt_deg, with_pixels=True).hu
        return img
    try:
        img.hu = _display_hu(ds)
    except Rejected:
        raise
    except OSError as e:  # the file went away or became unreadable since its header was read
        raise Rejected(f"cannot read file: {e.strerror or e}") from None
    except VALUE_ERRORS as e:
        raise Rejected(f"malformed DICOM pixel data: {type(e).__name__}: {str(e)[:160]}") from None
    return img


def _display_hu(ds: pydicom.Dataset) -> np.ndarray:
    iop = _floats(ds.get("ImageOrientationPatient"), 6) or [1, 0, 0, 0, 1, 0]
    return to_display(hounsfield(ds), iop)


def from_dataset(ds: pydicom.Dataset, key: str, max_tilt_deg: float = 10.0, with_pixels: bool = True) -> SliceImage:
    """Check a parsed dataset and turn it into a SliceImage (HU in display orientation when with_pixels)."""
    if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
        raise Rejected("DICOMDIR index file, not an image")
    try:
        check_header(ds, max_tilt_deg)
    except Rejected as e:
        e.series_uid = str(ds.get("SeriesInstanceUID", "") or "")  # type: ignore[attr-defined]
        raise
    iop = _floats(ds.get("ImageOrientationPatient"), 6) or [1, 0, 0, 0, 1, 0]
    normal = _unit_normal(iop)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    if ipp is not None:
        position = ipp[0] * normal[0] + ipp[1] * normal[1] + ipp[2] * normal[2]
    elif ds.get("SliceLocation") is not None:
        position = float(ds.SliceLocation)
    else:
        position = float(ds.get("InstanceNumber", 0) or 0)
    spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2) or [0.7, 0.7]
    if abs(iop[1]) > abs(iop[0]):  # transposed into display orientation
        spacing = spacing[::-1]
    expected = ds.get("ImagesInAcquisition")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    img = SliceImage(
        key=key,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "unknown-series"),
        study_uid=str(ds.get("StudyInstanceUID", "") or "unknown-study"),
        position=position,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        thickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
        instance=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        sop_uid=str(ds.get("SOPInstanceUID", "") or "") or None,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        transfer_syntax=getattr(ts, "name", "") if ts else "",
        expected_count=int(expected) if expected not in (None, "") and str(expected).isdigit() else None,
        patient_position=str(ds.get("PatientPosition", "") or "").strip().upper()[:8],
    )
    if with_pixels:
        img.hu = _display_hu(ds)
    else:
        img.source = ds
    return img
