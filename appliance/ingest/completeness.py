"""Is a DICOM file complete? `check_complete` reads the header and the 8-byte item headers of compressed pixel
data only (never the pixel data itself) to tell a whole file from one still being written or cut short; the
watch folder takes a file only when it is whole, and the reader rejects a cut-short file with a reason that says
so (`check_not_cut_short`).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

from appliance.ingest.dicom_file import Rejected, read_dataset

PIXEL_DATA = 0x7FE00010
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: an image has one of them
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQ_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
#: explicit-VR value representations with a 2-byte reserved field and a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def check_not_cut_short(ds: pydicom.Dataset, size: int, path: Path) -> None:
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
