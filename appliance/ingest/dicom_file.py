"""Parsing a DICOM file into a pydicom Dataset, and `Rejected`: the one-line reason a file is not usable.

Files without the 128-byte preamble are accepted (force); garbage, truncated or corrupt files are rejected with a
reason that says which.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError


NOT_DICOM = "not a DICOM file"  # how the reason of a file that is not DICOM at all begins

#: files beside a series that are plainly not slices (annotations, licences, manifests): summed up, not listed
DOCUMENT_SUFFIXES = {".xml", ".txt", ".csv", ".tsv", ".json", ".md", ".pdf", ".html", ".htm", ".log", ".ini", ".yaml",
                     ".yml", ".nii", ".gz", ".zip", ".npy", ".py", ".sh"}
DOCUMENT_NAMES = {"LICENSE", "LICENCE", "README", "NOTICE", "COPYING", "ATTRIBUTION"}


def is_document(file: str, reason: str) -> bool:
    """A rejected file that is plainly a document beside the slices (XML annotations, a licence, a manifest), not a
    broken slice: named like one and not DICOM at all. A .dcm or suffix-less file that is not DICOM is not one: it
    may be a broken export."""
    p = os.path.basename(file)
    suffix = os.path.splitext(p)[1].lower()
    return (suffix in DOCUMENT_SUFFIXES or p.upper() in DOCUMENT_NAMES) and reason.startswith(NOT_DICOM)


def document_kinds(files: list[str]) -> str:
    """'xml 20, LICENSE 1, csv 1': what the skipped documents are, commonest first."""
    from collections import Counter

    kinds = Counter(os.path.splitext(f)[1].lower().lstrip(".") or os.path.basename(f) for f in files)
    return ", ".join(f"{k} {n}" for k, n in kinds.most_common())


class Rejected(Exception):
    """A file that is not a usable axial CT slice; `reason` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
        raise Rejected(f"{NOT_DICOM} ({type(e).__name__})") from None
    if "SOPClassUID" not in ds and "Modality" not in ds and "PixelData" not in ds:
        raise Rejected(f"{NOT_DICOM} (no DICOM header or elements found)")
    return ds


def _unreadable(e: Exception) -> str:
    """Reason for a parse that raised: pydicom's errors when the bytes run out mid-element say truncated."""
    text = str(e)
    if isinstance(e, (struct.error, EOFError)) or "No tag to read" in text or "truncated" in text:
        return f"truncated DICOM file: header cut short ({type(e).__name__}: {text[:120]})"
    return f"unreadable DICOM: {type(e).__name__}: {e}"
