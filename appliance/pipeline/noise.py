"""Image noise at the lesion model's input, and what the appliance does about it (DICOM slices only). Pure numpy.

Why: the lesion model reads fine, blotchy texture as ground glass. CT-like noise added to normal lung crops
(models/LESION2.md) makes few of them boxed up to a noise of about 0.02 on this module's scale, then quickly
most: a sharp-kernel or low-dose series could be called positive on noise alone. Noise is measured on the crop
the model sees (lung window, 224²): the robust SD of the residual to the 4-neighbour mean, over parenchyma
(grey 0.15-0.45, about −1125 to −675 HU). Clean real series measure 0.006-0.009 there, the noisiest one at hand
(5 mm, Philips) 0.021.

- `crop_noise`: that figure for one crop (None when the crop shows too little parenchyma).
- `smooth_to`: the least Gaussian smoothing that brings a crop down to a target (or the strongest tried).
- `acquisition`: the series' figure (median over its lung slices) and whether it is outside the validated range,
  for the verdict ("noisy acquisition": read the boxes with care; the go-live check in the README).

Exported crop images (PNG/JPEG) are never smoothed: their compression texture reads as noise here, and smoothing
them costs Dice (measured on the radiologist slices).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

PARENCHYMA = (0.15, 0.45)  # lung-window grey of aerated lung
MIN_PIXELS = 500  # fewer parenchyma pixels than this: no estimate (apex, base, a slice below the lungs)
_K = 1.4826 / np.sqrt(1.25)  # MAD → SD of the pixel noise, for white noise through the 4-neighbour residual
SIGMAS = (0.5, 0.7, 0.9, 1.2, 1.5, 2.0)  # smoothing tried, mildest first (pixels at the model's size)
NOISY = 0.016  # series above this: "noisy acquisition" on the verdict (normal crops start to be boxed here)
TARGET = 0.010  # crops above this are smoothed down to it (where that is on)


def crop_noise(crop: np.ndarray) -> float | None:
    """Robust noise SD of a lung-window crop in [0, 1] over its parenchyma, or None with too little of it."""
    a = np.asarray(crop, np.float32)
    if a.ndim != 2 or min(a.shape) < 3:
        raise ValueError(f"crop must be a 2-D image of at least 3×3 pixels, got shape {a.shape}")
    c = a[1:-1, 1:-1]
    sel = (c > PARENCHYMA[0]) & (c < PARENCHYMA[1])
    if int(sel.sum()) < MIN_PIXELS:
        return None
    r = (c - 0.25 * (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]))[sel]
    return float(_K * np.median(np.abs(r - np.median(r))))


def smooth_to(crop: np.ndarray, target: float, noise: float | None = None) -> tuple[np.ndarray, float]:
    """(crop smoothed just enough to measure ≤ target, sigma used); sigma 0 when it already does or has no
    estimate. `noise`: the crop's figure when already measured."""
    noise = crop_noise(crop) if noise is None else noise
    if noise is None or noise <= target:
        return crop, 0.0
    a = np.asarray(crop, np.float32)
    out, used = a, 0.0
    for s in SIGMAS:
        out, used = ndi.gaussian_filter(a, s, mode="nearest"), s
        n = crop_noise(out)
        if n is None or n <= target:
            break
    return out.astype(np.float32, copy=False), float(used)


def acquisition(noise: Sequence[float | None], smoothed: int = 0, limit: float = NOISY,
                flat_boxes: int = 0) -> dict | None:
    """The series' noise (median over slices with an estimate), whether it is above `limit`, how many slices
    were smoothed and how many lesion boxes were dropped as no denser than the lung (appliance.pipeline.opacity);
    None when no slice had an estimate (crop images, no lung)."""
    vals = [float(v) for v in noise if v is not None]
    if not vals:
        return None
    med = float(np.median(vals))
    return {"noise": round(med, 4), "noisy": bool(med > limit), "limit": limit, "smoothed_slices": int(smoothed),
            "slices_measured": len(vals), "flat_boxes": int(flat_boxes)}
