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
