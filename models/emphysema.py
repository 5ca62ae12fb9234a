"""Centrilobular emphysema added to a real series: a check of what a smoker's lungs do to the case rule.

Emphysema shows as lucencies (air, about −970 HU) of a few millimetres without a visible wall, scattered through
otherwise normal lung. The lesion model reads texture: the normal lung between dark lucencies looks to it like
ground glass. This module places spheres of radius `radius_mm` at random in the series' volume, as many as fill
`share` of a chest box's lung-sized fraction, and sets the aerated lung (< −600 HU) inside them to −970 HU (with
15 HU of noise); vessels and soft tissue are left alone. The spheres are the same for every slice (a lucency
continues through neighbouring slices), seeded: the same series every time.

    python -m models.probe_foci --only emphysema        # verdicts and foci at several shares

What it is not: a model of real emphysema (no upper-lobe predominance, no bullae, no hyperinflation, no vessel
pruning); a share at which a normal series turns positive here is a risk to measure, not a calibration. The share
of lung below −950 HU that results (the usual emphysema index, LAA-950) is what to compare with real scans:
a share of 0.25 gave about 10 % here (mild to moderate emphysema).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.series_rewrite import rewrite_series

LUCENT_HU = -970.0  # an emphysematous space
AERATED_HU = -600.0  # only aerated lung becomes lucent (vessels, airway walls and soft tissue stay)
LUNG_FRACTION = 0.35  # the lungs' share of a chest slice's bounding box, for the sphere count


def spheres(shape_mm: tuple[float, float, float], share: float, radius_mm: tuple[float, float] = (2.0, 6.0),
            seed: int = 0) -> np.ndarray:
    """Rows (y, x, z, r) in mm of random spheres whose volumes add up to `share` of the lung-sized part of a box
    of `shape_mm` (height, width, length)."""
    if not 0.0 <= share <= 2.0:
        raise ValueError(f"share must be between 0 and 2, got {share:g}")
    rng = np.random.default_rng(seed)
    h, w, z = shape_mm
    r = rng.uniform(radius_mm[0], radius_mm[1], 1_000_000)
    n = int(np.searchsorted(np.cumsum(4.0 / 3.0 * np.pi * r ** 3), share * h * w * z * LUNG_FRACTION))
    return np.c_[rng.uniform(0, h, n), rng.uniform(0, w, n), rng.uniform(0, z, n), r[:n]]


def add_lucencies(hu: np.ndarray, spacing_mm: tuple[float, float], z_mm: float, balls: np.ndarray,
                  seed: int = 0) -> np.ndarray:
    """`hu` with the aerated lung inside the sections of `balls` (rows y, x, z, r in mm) at `z_mm` set lucent."""
    sy, sx = spacing_mm
    dz = np.abs(balls[:, 2] - z_mm)
    cut = balls[dz < balls[:, 3]]
    mask = np.zeros(hu.shape, bool)
    for cy, cx, cz, r in cut:
        rr = float(np.sqrt(r * r - (cz - z_mm) ** 2))
        y0, y1 = max(0, int((cy - rr) / sy)), min(hu.shape[0], int((cy + rr) / sy) + 2)
        x0, x1 = max(0, int((cx - rr) / sx)), min(hu.shape[1], int((cx + rr) / sx) + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= (yy * sy - cy) ** 2 + (xx * sx - cx) ** 2 <= rr * rr
    mask &= hu < AERATED_HU
    if not mask.any():
        return hu.copy()
    noise = np.random.default_rng(seed).normal(0.0, 15.0, hu.shape).astype(np.float32)
    return np.where(mask, np.minimum(hu, LUCENT_HU + noise), hu).astype(np.float32)


def write_emphysema(src: Path, out: Path, share: float, spacing_z_mm: float, enlarge: int = 1, seed: int = 0) -> int:
    """The axial CT series in `src` (its largest one) with emphysema of `share` (spheres of 2-6 mm radius, slices
    `spacing_z_mm` apart), each slice first enlarged `enlarge` times in-plane, as a new series in `out`; returns the
    slice count."""
    state: dict[str, np.ndarray] = {}

    def change(hu: np.ndarray, spacing: tuple[float, float], k: int, n: int) -> tuple[np.ndarray, tuple[float, float]]:
        if "balls" not in state:
            state["balls"] = spheres((hu.shape[0] * spacing[0], hu.shape[1] * spacing[1], n * spacing_z_mm), share,
                                     seed=seed)
        return add_lucencies(hu, spacing, k * spacing_z_mm, state["balls"], seed=k), spacing

    label = f"emphysema {share:g}" + (f", enlarged {enlarge}×" if enlarge > 1 else "")
    return rewrite_series(src, out, change, label, enlarge)
