"""Series coverage, pure: do the slices received so far look like a whole chest series, or like part of one?

A chest CT series runs from above the lung apices to below the bases, at one slice spacing. So when the lung is
still large on the first or the last slice received, or slices are missing between the first and the last, the
export has most likely paused (or a file is still being written), and the quiet time alone should not make the
verdict final yet. Measured on the full series at hand (COVID-CT-MD P001 and cap001, Lung-PET-CT-Dx A0001): no lung
on the three slices at either end; the lung's first slice holds 0.04–0.13 and its last 0.12–0.23 of the largest
lung area (so a scan cut right at the lung's end still looks whole); the first 70 of P001's 148 slices end in a
slice with 0.9 of the largest lung area seen so far.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.domain import SliceFinding

END_LUNG_SHARE = 0.25  # lung area at an end slice, as a share of the largest seen: the lung goes on past it
ENDED_LUNG_SHARE = 0.05  # ... at most this: the lung has ended there (the stricter test for a weak signal)
GAP_FACTOR = 1.5  # a step between neighbouring slices longer than this many spacings: slices are missing
MIN_SLICES = 3  # fewer slices than this: nothing to judge


def lung_areas(findings: Sequence[SliceFinding]) -> np.ndarray:
    """Lung area of each slice: mm² from the grade's measures where every slice has them (HU slices), else the
    lung box in pixels (0 where no lung was found)."""
    if findings and all(f.measures is not None for f in findings):
        return np.array([(f.measures.lung_right + f.measures.lung_left) * f.measures.pixel_mm2  # type: ignore[union-attr]
                         for f in findings], float)
    return np.array([f.lung.height * f.lung.width if f.lung else 0 for f in findings], float)


def missing_slices(positions: Sequence[float]) -> tuple[int, float, float] | None:
    """(slices missing, between z, and z) for the widest step between neighbouring positions that is longer than
    GAP_FACTOR spacings, with the count over all such steps; None when the positions are evenly filled."""
    z = np.unique(np.asarray(positions, float))
    if len(z) < MIN_SLICES:
        return None
    steps = np.diff(z)
    spacing = float(np.median(steps))
    if spacing <= 0:
        return None
    long = steps > GAP_FACTOR * spacing
    if not long.any():
        return None
    count = int(sum(round(s / spacing) - 1 for s in steps[long]))
    i = int(np.argmax(steps))
    return max(1, count), float(z[i]), float(z[i + 1])


def partial_reason(findings: Sequence[SliceFinding], end_share: float = END_LUNG_SHARE) -> str | None:
    """Why the findings (series order) look like part of a chest series, in words; None when they look whole (or
    hold no lung at all: not a chest series, nothing to wait for). end_share: the lung area at an end slice, as a
    share of the largest, from which the lung goes on past it."""
    if len(findings) < MIN_SLICES:
        return None
    areas = lung_areas(findings)
    top = float(areas.max())
    if top <= 0:
        return None
    gap = missing_slices([f.position for f in findings])
    if gap is not None:
        n, a, b = gap
        return f"{n} slice{'s' if n > 1 else ''} missing between z {a:g} and {b:g} mm"
    ends = [where for where, a in (("above the first", areas[0]), ("below the last", areas[-1]))
            if a > end_share * top]
    if ends:
        return f"the lung goes on {' and '.join(ends)} slice received"
    return None
