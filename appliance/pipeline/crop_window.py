"""Window standardisation for lung-window crop images (PNG/JPEG), whose display window is unknown.

Exported crops come in different windows: the same lung parenchyma can be grey level 14 in one set and 84 in
another. The lesion model works in the appliance's lung window [-1350, 150] HU, where parenchyma (≈ −870 HU)
sits at grey 82/255 and soft tissue (≈ 30 HU) at 234/255. For a series of crops, the two landmarks are read from
the pooled grey-level histogram (dark half: parenchyma; bright half: soft tissue) and a linear map puts them at
those positions. Implausible landmarks (a crop without soft tissue, a clipped window) leave the images as they are.
Pure numpy. DICOM slices never pass here: their window is exact.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CANON_LUNG, CANON_SOFT = 82.0, 234.0  # grey levels of parenchyma and soft tissue in [-1350, 150] HU


def landmarks(images: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """(parenchyma, soft tissue) peaks in 0..255 grey of [0, 1] images pooled, or None when implausible."""
    h = np.zeros(256)
    for a in images:
        h += np.bincount(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.int64).ravel(), minlength=256)
    if h.sum() == 0:
        return None
    h = np.convolve(h, np.ones(5) / 5, "same")
    lung = float(np.argmax(h[5:128]) + 5)
    soft = float(np.argmax(h[128:251]) + 128)
    dark, bright = h[5:128].max(), h[128:251].max()
    if soft - lung < 80 or dark < 0.002 * h.sum() or bright < 0.002 * h.sum():
        return None
    return lung, soft


def standardise(images: Sequence[np.ndarray], marks: tuple[float, float] | None) -> list[np.ndarray]:
    """Apply the linear grey map that puts the landmarks at the canonical positions (identity when None)."""
    if marks is None:
        return list(images)
    lung, soft = marks
    k = (CANON_SOFT - CANON_LUNG) / (soft - lung)
    b = (CANON_LUNG - lung * k) / 255.0
    return [np.clip(a * np.float32(k) + np.float32(b), 0.0, 1.0).astype(np.float32) for a in images]
