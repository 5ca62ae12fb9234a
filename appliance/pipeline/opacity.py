"""Is a lesion box an opacity? Pure numpy, HU slices only.

Ground glass is hazy *increased* attenuation of the lung. The lesion model reads texture, not density: on a noisy
scan, and around the dark lucencies of emphysema, normal-density lung between darker and brighter spots looks to it
like ground glass, and it boxes it with confidence (a normal chest with mild centrilobular emphysema added, or
with 150 HU of CT noise, came out COVID-19 positive: models/LESION2.md). The HU show what the model cannot: its
marked pixels there are no denser than the aerated lung around them.

A box is **flat** — not an opacity — when the median HU of its lesion pixels is both
- less than `MIN_CONTRAST_HU` above the slice's aerated lung (median of the lung region's pixels between
  `AERATED_HU`: emphysema and air below, vessels and lesions' solid parts above, left out), and
- below `FLAT_HU` in absolute terms: in diffuse disease the "aerated" lung is itself ground glass, so contrast
  alone would drop the most diseased slices (measured on COVID-19 slices of a diffusely involved lung: boxes at
  −705 HU on a lung at −726).

Measured (box lesion medians, DICOM series): COVID-19, pneumonia, TB and tumour-halo boxes lie 140–340 HU above
their slice's aerated lung (10th percentile); the boxes on emphysema or noise lie 0–25 HU above it (median).
Flat boxes are dropped before the case rule and counted (`SliceFinding.flat_boxes`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.domain import Box

AERATED_HU = (-950.0, -500.0)  # aerated lung: emphysema and air below, soft tissue above, left out
MIN_CONTRAST_HU = 75.0  # an opacity's lesion pixels lie at least this far above the slice's aerated lung ...
FLAT_HU = -720.0  # ... or above this absolutely (diffuse disease: the "aerated" lung is itself ground glass)
MIN_PIXELS = 200  # fewer aerated-lung pixels than this: no reference, every box is kept


def aerated_median(hu: np.ndarray, lung: np.ndarray) -> float | None:
    """Median HU of the aerated lung (`lung` region, between `AERATED_HU`), or None with too little of it."""
    v = hu[lung]
    v = v[(v > AERATED_HU[0]) & (v < AERATED_HU[1])]
    return float(np.median(v)) if v.size >= MIN_PIXELS else None


def lesion_median(hu: np.ndarray, lesion: np.ndarray, box: Box) -> float | None:
    """Median HU of the lesion pixels inside `box`'s rect, or None when it holds none."""
    r = box.rect
    v = hu[r.y0:r.y1, r.x0:r.x1][lesion[r.y0:r.y1, r.x0:r.x1]]
    return float(np.median(v)) if v.size else None


def is_flat(lesion_hu: float, reference_hu: float) -> bool:
    """Whether lesion pixels at `lesion_hu` are no opacity on lung at `reference_hu` (both conditions above)."""
    return lesion_hu < reference_hu + MIN_CONTRAST_HU and lesion_hu < FLAT_HU


def opaque_boxes(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray | None,
                 boxes: Sequence[Box]) -> tuple[list[Box], int]:
    """(boxes that are opacities, how many were flat). `hu`, `lung` (the lung region) and `lesion` (the lesion
    mask inside the boxes) at slice scale. Without a lesion mask or an aerated-lung reference, all are kept."""
    if lesion is None or not boxes:
        return list(boxes), 0
    ref = aerated_median(hu[::2, ::2], lung[::2, ::2])  # every fourth pixel: the same median, a third of the time
    if ref is None:
        return list(boxes), 0
    kept = []
    for b in boxes:
        m = lesion_median(hu, lesion, b)
        if m is None or not is_flat(m, ref):
            kept.append(b)
    return kept, len(boxes) - len(kept)
