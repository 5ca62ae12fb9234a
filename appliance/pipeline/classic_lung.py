"""Classical HU-threshold lung mask: the labeler and the cross-check of the valid-area model.

Air-like voxels (< -320 HU) enclosed by the body, minus anything connected to the outside air, minus small
pockets; only components large enough to be lung are kept. Pure numpy + scipy.ndimage.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

AIR_HU = -320.0
BODY_HU = -500.0


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected region denser than air, holes filled (the patient, without the table's air)."""
    dense = hu > BODY_HU
    dense = ndi.binary_opening(dense, iterations=2)
    lab, n = ndi.label(dense)
    if n == 0:
        return np.zeros_like(dense)
    sizes = ndi.sum(dense, lab, index=np.arange(1, n + 1))
    body = lab == (int(np.argmax(sizes)) + 1)
    return ndi.binary_fill_holes(body)


GAS_MEDIAN_HU = -935.0


def _is_gas(hu: np.ndarray, comp: np.ndarray) -> bool:
    """Bowel or stomach gas (and the trachea): the interior is nearly pure air. Lung parenchyma, a mix of air,
    vessels and tissue, has an interior median around -870 HU (higher when diseased)."""
    inner = ndi.binary_erosion(comp, iterations=3)
    if inner.sum() < 20:
        inner = comp
    return float(np.median(hu[inner])) < GAS_MEDIAN_HU


def lung_mask(hu: np.ndarray, pixel_area_mm2: float = 0.49, min_lung_cm2: float = 6.0) -> np.ndarray:
    """Boolean lung mask of an axial HU slice; empty where no lung is found.

    Components smaller than `min_lung_cm2` are dropped, as are components whose interior is almost pure air
    (bowel or stomach gas, the trachea: not parenchyma with vessels).
    """
    hu = np.asarray(hu, dtype=np.float32)
    body = body_mask(hu)
    cand = (hu < AIR_HU) & body
    cand = ndi.binary_opening(cand, iterations=1)
    lab, n = ndi.label(cand)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    idx = np.arange(1, n + 1)
    sizes = ndi.sum(cand, lab, index=idx) * pixel_area_mm2 / 100.0  # cm²
    keep = [i for i, a in zip(idx, sizes) if a >= min_lung_cm2 and not _is_gas(hu, lab == i)]
    mask = np.isin(lab, keep)
    mask = ndi.binary_closing(mask, iterations=3)
    return ndi.binary_fill_holes(mask)


def mask_box(mask: np.ndarray, margin: float = 0.0) -> tuple[int, int, int, int] | None:
    """Smallest (y0, x0, y1, x1) rectangle holding the mask (y1/x1 exclusive), grown by `margin` of its size."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if margin:
        dy, dx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
        y0, x0 = max(0, y0 - dy), max(0, x0 - dx)
        y1, x1 = min(mask.shape[0], y1 + dy), min(mask.shape[1], x1 + dx)
    return int(y0), int(x0), int(y1), int(x1)
