"""Pure-numpy image helpers: windowing, resizing, box arithmetic on 2-D arrays."""
from __future__ import annotations

import numpy as np
from PIL import Image

#: Lung window used by both models, in Hounsfield units (low, high).
LUNG_WINDOW: tuple[float, float] = (-1350.0, 150.0)


def window(hu: np.ndarray, low: float = LUNG_WINDOW[0], high: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Map HU to [0, 1] float32 with the given window (clipped)."""
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def resize(img: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D float or bool array to (rows, cols) with Pillow (bilinear, or nearest for masks)."""
    rows, cols = shape
    if img.shape == (rows, cols):
        return img.astype(np.float32, copy=False) if img.dtype != bool else img
    if img.dtype == bool:
        pil = Image.fromarray(img.astype(np.uint8) * 255)
        return np.asarray(pil.resize((cols, rows), Image.NEAREST)) > 127
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(pil.resize((cols, rows), method), dtype=np.float32)


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 grey."""
    return (np.clip(img01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
