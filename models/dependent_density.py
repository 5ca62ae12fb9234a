"""Dependent density added to a real series: a check of what gravity-dependent lung does to the case rule.

In a supine patient the posterior (dependent) lung is less aerated: ground-glass density at the back of both
lungs, densest at the pleura (a subpleural band: dependent atelectasis) and often as a haze through the dependent
lung. It is common on normal scans and goes away when the patient is turned prone. This module adds it to each HU
slice of a series — `amplitude` HU at a border, fading with `decay_mm` (exp(-depth/decay)) — in the posterior 35 %
of the aerated lung, on slices from `z_from` of the series on (head to feet), and writes the result as a new DICOM
series (the appliance's own CT writer: uncompressed, same positions and spacing). Two shapes (`subpleural`):

- haze (default): depth from any tissue — the pleura *and* the vessels and bronchi inside the lung (the aerated
  mask is not hole-filled), so the dependent parenchyma hazes around every structure;
- subpleural band: depth from the lung's outer border only (the mask with its holes filled): a band along the
  pleura, the rest of the dependent lung untouched.

    python -m models.probe_foci --only dependent        # verdicts and foci with the band at several amplitudes

What it is not: a model of real atelectasis (no volume loss, no fissure shift); a band that an appliance calls
COVID-19 here is a risk to measure, not a proof.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from appliance.pipeline.solid import fill_holes

POSTERIOR_SHARE = 0.35  # the band lies in this share of the lung's anterior-posterior extent, posteriorly
AIR_HU = -500.0  # aerated lung is below this
MIN_LUNG_MM2 = 300.0  # an air component smaller than this is a bronchus or bowel gas, not a lung


def aerated_lung(hu: np.ndarray, px_mm: float) -> np.ndarray:
    """Air components inside the body (not touching the image border) of ≥ `MIN_LUNG_MM2`, opened once."""
    lab, n = ndi.label(hu < AIR_HU)
    if n == 0:
        return np.zeros(hu.shape, bool)
    border = np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    area = np.bincount(lab.ravel(), minlength=n + 1) * px_mm * px_mm
    keep = area >= MIN_LUNG_MM2
    keep[border] = False
    keep[0] = False
    return ndi.binary_opening(keep[lab])


def add_dependent(hu: np.ndarray, px_mm: float, amplitude: float, decay_mm: float = 4.0,
                  seed: int = 0, subpleural: bool = False) -> np.ndarray:
    """`hu` (display orientation: posterior at the bottom) with a dependent band added; unchanged without lung
    or at amplitude 0. The band carries 30 % multiplicative texture (smoothed), as real parenchyma does, and stays
    inside the aerated lung."""
    lung = aerated_lung(hu, px_mm)
    if amplitude == 0 or not lung.any():
        return hu.copy()
    depth = ndi.distance_transform_edt(fill_holes(lung) if subpleural else lung, sampling=px_mm)
    rows = np.flatnonzero(lung.any(axis=1))
    cut = int(rows[-1] - POSTERIOR_SHARE * (rows[-1] - rows[0]))
    weight = np.exp(-depth / decay_mm) * lung
    weight[:cut] = 0.0
    rng = np.random.default_rng(seed)
    weight = ndi.gaussian_filter(weight * (1.0 + 0.3 * rng.standard_normal(weight.shape)), 0.7) * lung
    return hu + amplitude * weight.astype(hu.dtype)


def write_dependent(src: Path, out: Path, amplitude: float, decay_mm: float = 4.0, z_from: float = 0.3,
                    subpleural: bool = False) -> int:
    """The axial CT series in `src` (its largest one) with the band on slices from `z_from` of it (head to feet)
    on, as a new series in `out`; returns the slice count."""
    from models.series_rewrite import rewrite_series

    def change(hu: np.ndarray, spacing: tuple[float, float], k: int, n: int) -> tuple[np.ndarray, tuple[float, float]]:
        if k >= z_from * n:
            hu = add_dependent(hu, float(np.sqrt(spacing[0] * spacing[1])), amplitude, decay_mm, seed=k,
                               subpleural=subpleural)
        return hu, spacing

    return rewrite_series(src, out, change, f"dependent {'band' if subpleural else 'haze'} {amplitude:g} HU")
