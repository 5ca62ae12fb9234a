"""DICOM file → SliceImage: acceptance checks, HU, display orientation.

Accepted: CT (by Modality, or by SOP class when Modality is absent), one frame, axial within `max_tilt_deg`,
not a localizer, not a secondary capture / structured report / dose object, 16-bit (or 12-bit) stored values
with a Hounsfield rescale. Everything else raises `Rejected` with a specific, human-readable reason.
Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) are decoded by the pylibjpeg plugins.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from appliance.domain import SliceImage

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


class Rejected(Exception):
    """A file that is not a usable axial CT slice; `reason` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _floats(value, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def read_dataset(src: str | os.PathLike | BinaryIO, defer: bool = False, header_only: bool = False) -> pydicom.Dataset:
    """Parse a DICOM file; files without the 128-byte preamble are accepted (force), garbage is rejected.

    defer: leave large values (the pixel data) on disk until accessed — for a fast header pass.
    header_only: stop before the pixel data (an open file is then left positioned at its element).
    """
    kw: dict = {"defer_size": "4 KB"} if defer else {}
    if header_only:
        kw["stop_before_pixels"] = True
    try:
        return pydicom.dcmread(src, **kw)
    except InvalidDicomError:
        pass
    except Exception as e:  # truncated or corrupt
        raise Rejected(_unreadable(e)) from None
    if hasattr(src, "seek"):
        src.seek(0)  # type: ignore[union-attr]
    try:
        ds = pydicom.dcmread(src, force=True, **kw)
    except Exception as e:
        raise Rejected(f"not a DICOM file ({type(e).__name__})") from None
    if "SOPClassUID" not in ds and "Modality" not in ds and "PixelData" not in ds:
        raise Rejected("not a DICOM file (no DICOM header or elements found)")
    return ds


def _unreadable(e: Exception) -> str:
    """Reason for a parse that raised: pydicom's errors when the bytes run out mid-element say truncated."""
    text = str(e)
    if isinstance(e, (struct.error, EOFError)) or "No tag to read" in text or "truncated" in text:
        return f"truncated DICOM file: header cut short ({type(e).__name__}: {text[:120]})"
    return f"unreadable DICOM: {type(e).__name__}: {e}"


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
        raw = ds.pixel_array
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


PIXEL_DATA = 0x7FE00010
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: an image has one of them
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQ_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
#: explicit-VR value representations with a 2-byte reserved field and a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

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
    _check_not_cut_short(ds, size, p)
    try:
        return from_dataset(ds, key=str(p), max_tilt_deg=max_tilt_deg, with_pixels=with_pixels)
    except Rejected:
        raise
    except VALUE_ERRORS as e:
        # a header value pydicom parsed but that makes no sense (text in a number, a wrong multiplicity …)
        raise Rejected(f"malformed DICOM header: {type(e).__name__}: {str(e)[:160]}") from None


def _check_not_cut_short(ds: pydicom.Dataset, size: int, path: Path) -> None:
    """Reject a cut-short file with a reason that says so (before it can stand in for an intact duplicate, and
    instead of "no pixel data" or a decoder error). pydicom reads truncated files without complaint: a short
    value stays short, a header cut before the pixel data reads as a header without it, and a cut inside
    compressed pixel data leaves an empty data set."""
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    if raw is None:
        if is_image(ds):  # an image without pixel data: find out where the file ends
            why = check_complete(path).why
            if why:
                raise _rejected(why, ds)
        return
    if not isinstance(raw, RawDataElement) or raw.length == UNDEFINED_LENGTH:
        return  # converted already, or compressed: pydicom found its sequence delimiter (else it has no pixel data)
    have = len(raw.value) if raw.value is not None else max(0, size - raw.value_tell)
    if have < raw.length:
        raise _rejected(f"pixel data truncated (file cut short: {have} of {raw.length} bytes)", ds)


def _rejected(reason: str, ds: pydicom.Dataset) -> Rejected:
    e = Rejected(reason)
    e.series_uid = str(ds.get("SeriesInstanceUID", "") or "")  # type: ignore[attr-defined]
    return e


def is_image(ds: pydicom.Dataset) -> bool:
    """An image SOP class (CT Image Storage, any "... Image Storage") in the file meta or the data set, or a header
    with Rows and Columns: pixel data is required."""
    meta = ds.get("file_meta", {})
    for uid in (meta.get("MediaStorageSOPClassUID", ""), ds.get("SOPClassUID", "")):
        try:
            if "ImageStorage" in UID(str(uid or "")).keyword:
                return True
        except Exception:  # noqa: BLE001 - a malformed (cut short) UID
            continue
    return "Rows" in ds and "Columns" in ds


@dataclass
class Extent:
    """What `check_complete` found: why the file is not complete (None: it holds everything its header declares),
    its header (pixel data left on disk) when that parsed, and whether whole pixel data was found (proof)."""

    why: str | None
    ds: pydicom.Dataset | None = None
    pixels: bool = False


def check_complete(path: str | os.PathLike) -> Extent:
    """Check a file holds everything its header declares, reading the header and the 8-byte item headers of
    compressed pixel data only (never the pixel data itself).

    Complete: the header parses; an image has pixel data, whose declared length (or, compressed, whose fragments
    up to the sequence delimiter) fits in the file; and any element after it, or the last element of an object
    without pixel data, ends within the file. A cut exactly between two elements of a non-image object cannot
    be told from its end: the caller's stability wait covers that.
    """
    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        return Extent(f"cannot read file: {e.strerror}")
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return Extent("empty file")
        try:
            ds = read_dataset(f, defer=True, header_only=True)
        except Rejected as e:
            return Extent(e.reason)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts == pydicom.uid.DeflatedExplicitVRLittleEndian and len(ds):
            return Extent(None, ds, True)  # the deflate stream was inflated whole: zlib found its end (else it raised)
        return _extent(f, ds, f.tell(), size)


def _extent(f: BinaryIO, ds: pydicom.Dataset, pos: int, size: int) -> Extent:
    f.seek(pos)
    head = f.read(8)
    endian = next((e for e in "<>" if len(head) == 8 and _tag(head, e) in PIXEL_TAGS), None)
    if endian is None:  # the parse ran to the end of the file without meeting pixel data
        return Extent(_without_pixels(ds, size), ds)
    # explicit VR: OB/OW/… and two zero bytes; implicit VR: a 4-byte length there, which would be odd (invalid)
    explicit = head[4:6] in _LONG_VRS and head[6:8] == b"\0\0"
    end, why = _pixel_end(f, pos, size, endian, explicit)
    if why is None:
        why = _after_pixels(f, end, size, endian, explicit)
    return Extent(why, ds, why is None)


def _tag(head: bytes, endian: str) -> int:
    group, elem = struct.unpack(endian + "HH", head[:4])
    return group << 16 | elem


def _without_pixels(ds: pydicom.Dataset, size: int) -> str | None:
    tags = sorted(ds.keys())
    last = ds.get_item(tags[-1], keep_deferred=True) if tags else None  # still raw: nothing has read its value
    if is_image(ds):
        return f"truncated DICOM file: header ends before the pixel data ({size} bytes)"
    if last is None:
        return f"truncated DICOM file: nothing after the file meta information ({size} bytes)"
    length, start = getattr(last, "length", None), getattr(last, "value_tell", None)
    if not isinstance(last, RawDataElement) or length is None or start is None or length == UNDEFINED_LENGTH:
        return None  # an undefined-length sequence: pydicom read up to its delimiter (else it raised)
    if start + length > size:
        return f"truncated DICOM file: header cut short inside element {last.tag} ({size} bytes)"
    if start + length < size:
        return f"truncated DICOM file: {size - start - length} bytes after the last complete element"
    return None


def _element_header(f: BinaryIO, pos: int, endian: str, explicit: bool) -> tuple[int, int, int] | None:
    """(tag, length, value offset) of the element at pos; None when the file ends inside its header."""
    f.seek(pos)
    head = f.read(8)
    if len(head) < 8:
        return None
    tag = _tag(head, endian)
    if not explicit or tag >> 16 == 0xFFFE:  # implicit VR, or an item / delimiter: a 4-byte length
        return tag, struct.unpack(endian + "L", head[4:8])[0], pos + 8
    if head[4:6] in _LONG_VRS:
        more = f.read(4)
        return (tag, struct.unpack(endian + "L", more)[0], pos + 12) if len(more) == 4 else None
    return tag, struct.unpack(endian + "H", head[6:8])[0], pos + 8


def _pixel_end(f: BinaryIO, pos: int, size: int, endian: str, explicit: bool) -> tuple[int, str | None]:
    """(where the pixel data element at pos ends, why it is cut short or None)."""
    head = _element_header(f, pos, endian, explicit)
    if head is None:
        return size, f"truncated DICOM file: header ends inside the pixel data element ({size} bytes)"
    _, length, start = head
    if length != UNDEFINED_LENGTH:
        if start + length > size:
            return size, f"pixel data truncated (file cut short: {size - start} of {length} bytes)"
        return start + length, None
    at, n = start, 0  # compressed: items (offset table, fragments) up to the sequence delimiter
    while True:
        f.seek(at)
        item = f.read(8)
        if len(item) < 8:
            return size, (f"compressed pixel data truncated (file cut short after {size - start} bytes of it: "
                          f"no sequence delimiter)")
        group, elem, length = struct.unpack(endian + "HHL", item)
        if (group, elem) == _SEQ_DELIMITER:
            return at + 8, None
        if (group, elem) != _ITEM:
            return size, f"malformed compressed pixel data: ({group:04X},{elem:04X}) where an item should be"
        if at + 8 + length > size:
            return size, (f"compressed pixel data truncated (file cut short: item {n} holds {size - at - 8} "
                          f"of {length} bytes)")
        at, n = at + 8 + length, n + 1


def _after_pixels(f: BinaryIO, pos: int, size: int, endian: str, explicit: bool) -> str | None:
    """Elements after the pixel data (padding, signatures) must end within the file too."""
    while pos < size:
        head = _element_header(f, pos, endian, explicit)
        if head is None:
            return f"truncated DICOM file: cut short after the pixel data ({size} bytes)"
        _, length, start = head
        if length == UNDEFINED_LENGTH:
            return None  # a sequence: rare here, and pydicom reads it when the file is used
        pos = start + length
        if pos > size:
            return f"truncated DICOM file: cut short after the pixel data ({size} bytes)"
    return None


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
    )
    if with_pixels:
        img.hu = _display_hu(ds)
    else:
        img.source = ds
    return img
