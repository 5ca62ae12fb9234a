"""Slice geometry shared by ingest and the case rule, pure: series order along the slice normal, spacing, gaps.

Order is head → feet (descending position along a head-pointing normal), never InstanceNumber alone.
"""
from __future__ import annotations

from typing import Any

import numpy as np

GAP_FACTOR = 1.5


def sort_key(s: Any) -> tuple:
    """Series order of a slice (anything with position, instance and key: a SliceImage)."""
    return (-s.position, s.instance if s.instance is not None else 0, s.key)


def median_spacing(positions: list[float] | np.ndarray) -> float:
    """Median distance between neighbouring distinct positions (0 when fewer than two)."""
    p = np.unique(np.asarray(positions, dtype=float))
    if p.size < 2:
        return 0.0
    return float(np.median(np.diff(p)))


def rect_array(rects: Any) -> np.ndarray:
    """Rects (anything with y0, x0, y1, x1) as an (n, 4) float array [y0, x0, y1, x1], for pairwise tests."""
    return np.array([(r.y0, r.x0, r.y1, r.x1) for r in rects], dtype=float).reshape(-1, 4)


def slice_pairs(slice_of: np.ndarray, link: np.ndarray, max_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of items on slices 1 … `max_step` apart with no missing slice between (`links`): indices into
    `slice_of` (each item's slice index, non-decreasing), b on the earlier slice. Vectorised: a series holds
    thousands of boxes, and the case rule pairs them on every update."""
    s = np.asarray(slice_of, dtype=int)
    breaks = np.concatenate([[0], np.cumsum(~np.asarray(link, dtype=bool))])  # gaps among the first k links
    firsts, seconds = [np.zeros(0, int)], [np.zeros(0, int)]
    for t in range(1, s.size):  # items t apart in order: their slices are further apart the larger t
        a = np.arange(t, s.size)
        d = s[a] - s[a - t]
        if not (d <= max_step).any():
            break
        ok = (d >= 1) & (d <= max_step) & (breaks[s[a]] == breaks[s[a - t]])
        firsts.append(a[ok])
        seconds.append(a[ok] - t)
    return np.concatenate(firsts), np.concatenate(seconds)


def links(positions: list[float] | np.ndarray, gap_factor: float = GAP_FACTOR) -> np.ndarray:
    """For sorted positions, links[i] is True when slice i and i+1 are neighbours (gap ≤ factor × median)."""
    p = np.asarray(positions, dtype=float)
    if p.size < 2:
        return np.zeros(0, dtype=bool)
    d = np.abs(np.diff(p))
    med = median_spacing(p)
    if med <= 0:
        return np.ones(d.size, dtype=bool)
    return d <= gap_factor * med + 1e-6
