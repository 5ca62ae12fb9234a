"""Lung-window crop images (PNG/JPEG) → SliceImage, one series per folder, natural name order.

These are already lung-box crops in a lung window (what the lesion model sees), so the valid-area stage is
skipped for them. Colour images are converted to grey; 16-bit images are scaled by their range.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from appliance.domain import SliceImage
from appliance.ingest.dicom_reader import Rejected

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path, index: int, series: str) -> SliceImage:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                a = np.asarray(im, dtype=np.float32)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
            else:
                a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise Rejected(f"unreadable image: {type(e).__name__}: {e}") from None
    if a.ndim != 2 or min(a.shape) < 16:
        raise Rejected(f"image too small ({a.shape[0]}x{a.shape[1]})")
    return SliceImage(key=str(path), series_uid=series, study_uid=series, position=-float(index), window01=a)


def image_series(folder: Path, files: list[Path], standardise_window: bool = True) -> tuple[list[SliceImage], list[dict]]:
    """Read the crop images of one folder in natural name order; rejected files come back with reasons.

    The folder's display window is standardised to the appliance's lung window from its pooled grey-level
    landmarks (appliance/pipeline/crop_window.py): crops exported with another window read the same.
    """
    from appliance.pipeline.crop_window import landmarks, standardise

    out, rejected = [], []
    for i, p in enumerate(sorted(files, key=lambda q: natural_key(q.name))):
        try:
            out.append(read_image(p, i, str(folder)))
        except Rejected as e:
            rejected.append({"file": str(p), "reason": e.reason})
    if standardise_window and out:
        fixed = standardise([s.window01 for s in out], landmarks([s.window01 for s in out]))  # type: ignore[misc]
        for s, a in zip(out, fixed):
            s.window01 = a
    return out, rejected
