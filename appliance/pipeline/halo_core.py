"""Soft tissue a lesion's halo wraps, pure numpy + scipy: the core of a mass the lesion model rings but does not mark.

The lesion model marks ground glass and the hazy halo of a lesion; the solid core of a tumour it leaves unmarked.
Where the tumour is broad-based on the chest wall or the mediastinum, its core is continuous with them, so
`appliance.pipeline.solid` (which needs lung around a solid lesion) cannot report it. What does show it is the
halo's shape: the halo rings the core from the lung side, so the convex hull of the lesion mask holds soft tissue
the mask does not. A ground-glass patch that lines the chest wall follows the rib cage, which is convex around the
lung: its hull holds lung, not chest wall. Consolidation the model marks is part of the mask, not of the core.

Per lesion component (`wrapped_cores`): soft tissue (≥ `SOLID_HU`, opened by `OPEN_MM` so that vessels and
septa go) inside the component's convex hull and outside the mask; its largest connected part is the core, kept
when it covers at least `MIN_CORE_MM2` (a few hundred bytes a slice in the store).

Measured on real series (2026-12-07, lesion 2.6.0): the tumour of Lung-PET-CT-Dx A0001 gives a core of 652 mm²,
20 mm thick (621–692 mm² in each of six rewrites of that series: mirrored, resampled to 2.5 and 10 mm, shifted,
with noise); no core of the COVID-19 series P001 (and its rewrites) reaches 140 mm², nor of the pneumonia cap001
120 mm², of TB Portals volume 1 270 mm². But the hull of bilateral COVID-19 lesions that surround the hila holds a
hilum: 390–1,440 mm² on COVID-19-NY-SBU slices (where lesion covers 40–100 % of the lungs). So a core alone is not a
mass: `appliance.pipeline.mass_foci` names a focus a mass (and takes it out of the count) only where the core's
slice is mostly clear lung and the focus is about as long along z as it is wide.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from appliance.domain import Core, Rect
from appliance.pipeline.solid import OPEN_MM, SOLID_HU, block_mean, morph, work_factor

MIN_COMPONENT_MM2 = 50.0  # lesion components smaller than this have no hull worth measuring
MIN_CORE_MM2 = 100.0  # cores below this are not kept
MASS_CORE_MM2 = 300.0  # a core this large (a disk of about 20 mm) ...
MASS_CORE_MM = 10.0  # ... and at least this thick makes a single focal lesion a mass


def hull_mask(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a boolean mask's pixels (pixel centres), filled; the mask itself where it is degenerate."""
    ys, xs = np.nonzero(mask)
    if ys.size < 3 or np.ptp(ys) < 1 or np.ptp(xs) < 1:
        return mask.copy()
    try:
        hull = ConvexHull(np.c_[ys, xs].astype(np.float64))
    except QhullError:  # collinear points
        return mask.copy()
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    gy, gx = np.mgrid[y0:y1, x0:x1]
    inside = np.ones(gy.shape, bool)
    for a, b, c in hull.equations:  # a·y + b·x + c ≤ 0 inside; half a pixel of slack for the pixels on the hull
        inside &= a * gy + b * gx + c <= 0.5
    out = mask.copy()
    out[y0:y1, x0:x1] |= inside
    return out


def wrapped_cores(hu: np.ndarray, lesion: np.ndarray | None, boxes: Sequence[Rect],
                  spacing_mm: tuple[float, float] | float) -> list[Core]:
    """The cores lesion components wrap on one slice (display orientation), largest first.

    lesion: the lesion mask at slice scale (`grading.lesion_at_slice`: inside the accepted boxes), or None;
    boxes: those boxes (each component is measured within the box that holds it).
    """
    if lesion is None or not boxes:
        return []
    sy, sx = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else spacing_mm  # type: ignore[misc]
    px = float(math.sqrt(sy * sx))
    f = work_factor(px)
    mm = px * f
    r = int(round(OPEN_MM / mm))
    out: list[Core] = []
    h_full, w_full = hu.shape
    for b in boxes:
        y0, x0 = max(b.y0, 0) // f * f, max(b.x0, 0) // f * f
        y1, x1 = min(b.y1, h_full), min(b.x1, w_full)
        if y1 - y0 < 2 * f or x1 - x0 < 2 * f:
            continue
        h = block_mean(hu[y0:y1, x0:x1], f)
        les = block_mean(lesion[y0:y1, x0:x1], f) >= 0.5
        dense = h >= SOLID_HU
        if r:  # opened (edge-padded: the box's border is not the end of the tissue)
            dense = morph(morph(np.pad(dense, r, mode="edge"), r, False), r, True)[r:-r, r:-r]
        lab, n = ndi.label(les)
        for k in range(1, n + 1):
            comp = lab == k
            if comp.sum() * mm * mm < MIN_COMPONENT_MM2:
                continue
            core = hull_mask(comp) & dense & ~les
            if not core.any():
                continue
            cl, _ = ndi.label(core)
            sizes = np.bincount(cl.ravel())
            sizes[0] = 0
            big = cl == int(np.argmax(sizes))
            area = float(big.sum()) * mm * mm
            if area < MIN_CORE_MM2:
                continue
            thick = 2.0 * float(ndi.distance_transform_edt(np.pad(big, 1)).max()) * mm
            ys, xs = np.nonzero(big)
            rect = Rect(y0 + int(ys.min()) * f, x0 + int(xs.min()) * f, y0 + (int(ys.max()) + 1) * f,
                        x0 + (int(xs.max()) + 1) * f)
            out.append(Core(rect, round(area, 1), round(thick, 1), float(round(h[big].mean()))))
    out.sort(key=lambda c: -c.area_mm2)
    return out


def is_mass_core(c: Core) -> bool:
    """A core large and thick enough to make a single focal lesion a mass."""
    return c.area_mm2 >= MASS_CORE_MM2 and c.thick_mm >= MASS_CORE_MM
