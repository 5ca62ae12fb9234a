"""CT image noise added to a real series: a check of what a noisier acquisition (low dose, a sharp lung kernel,
a large patient) does to the case rule.

Quantum noise in a reconstructed CT slice is close to Gaussian and correlated over about a pixel by the
reconstruction kernel. `add_noise` adds such noise — white noise blurred by `corr_px`, scaled to `sd_hu` — inside
the scanned field (padding below −1500 HU is left alone). `enlarge` first enlarges each slice in-plane (cubic)
so that the noise lands at a clinical pixel size: a research volume resampled to 128² (2.7 mm pixels) would
otherwise carry its noise in blobs that the lesion model sees magnified.

    python -m models.probe_foci --only noise [--noise-hu 0,50,100,150]

What it is not: a model of a real low-dose scan (no streaks, no photon starvation at the shoulders, no kernel
edge enhancement); a noise level at which a normal series turns positive here is a risk to measure, not a
calibration. The appliance's own figure for each result is in its verdict (`acquisition.noise`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from models.series_rewrite import rewrite_series

PADDING_HU = -1500.0  # below this: outside the scanned field (padding), left alone


def add_noise(hu: np.ndarray, sd_hu: float, corr_px: float = 0.6, seed: int = 0) -> np.ndarray:
    """`hu` with correlated Gaussian noise of standard deviation `sd_hu` added inside the scanned field."""
    if sd_hu < 0:
        raise ValueError(f"noise SD must be ≥ 0 HU, got {sd_hu:g}")
    if sd_hu == 0:
        return hu.copy()
    n = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(hu.shape).astype(np.float32), corr_px)
    n *= np.float32(sd_hu / max(float(n.std()), 1e-6))
    return np.where(hu > PADDING_HU, hu + n, hu).astype(np.float32)


def write_noisy(src: Path, out: Path, sd_hu: float, enlarge: int = 1, corr_px: float = 0.6) -> int:
    """The axial CT series in `src` (its largest one), each slice enlarged `enlarge` times and with noise of
    `sd_hu` added (seeded per slice: the same series every time), as a new series in `out`; returns the slice
    count."""
    def change(hu: np.ndarray, spacing: tuple[float, float], k: int, n: int) -> tuple[np.ndarray, tuple[float, float]]:
        return add_noise(hu, sd_hu, corr_px, seed=k), spacing

    label = f"noise {sd_hu:g} HU" + (f", enlarged {enlarge}×" if enlarge > 1 else "")
    return rewrite_series(src, out, change, label, enlarge)
