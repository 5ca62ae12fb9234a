"""A scan taken in expiration (or with poor inspiration), from a real inspiratory series: a check of what a denser
normal lung does to the case rule.

With less air in it, the whole lung is denser: normal parenchyma rises from about −850 HU at full inspiration to
−750…−700 at end-expiration. This module scales the aerated lung (< −500 HU) towards water, hu → −1000 +
(hu + 1000) × `factor` (−850 → −790 at 1.4, → −730 at 1.8), blended to the original over the last 100 HU below
−500 so that vessel and soft-tissue edges stay, and writes the result as a new series.

    python -m models.probe_foci --only expiration        # verdicts and foci at several factors

What it is not: a model of real expiration (no smaller lungs, no bowed tracheal wall, no air trapping); a factor
at which a normal series turns positive here is a risk to measure, not a calibration.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.series_rewrite import rewrite_series

AERATED_HU = -500.0  # lung below this is scaled; above, left alone
BLEND_HU = 100.0  # ... blended over this many HU below it
AIR_HU = -1000.0


def expire(hu: np.ndarray, factor: float) -> np.ndarray:
    """`hu` with its aerated lung scaled towards water by `factor` (1: unchanged)."""
    if not 1.0 <= factor <= 2.0:
        raise ValueError(f"factor must be between 1 and 2, got {factor:g}")
    lung = (hu < AERATED_HU) & (hu > AIR_HU - 10.0)  # padding (−2048, −3024) left alone
    denser = AIR_HU + (hu + 1000.0) * factor
    w = np.clip((AERATED_HU - hu) / BLEND_HU, 0.0, 1.0)
    out = np.where(lung, np.minimum(w * denser + (1.0 - w) * hu, AERATED_HU), hu)
    return out.astype(np.float32)


def write_expiration(src: Path, out: Path, factor: float, enlarge: int = 1) -> int:
    """The axial CT series in `src` (its largest one), each slice enlarged `enlarge` times and its aerated lung
    scaled by `factor`, as a new series in `out`; returns the slice count."""
    def change(hu: np.ndarray, spacing: tuple[float, float], k: int, n: int) -> tuple[np.ndarray, tuple[float, float]]:
        return expire(hu, factor), spacing

    label = f"expiration ×{factor:g}" + (f", enlarged {enlarge}×" if enlarge > 1 else "")
    return rewrite_series(src, out, change, label, enlarge)
