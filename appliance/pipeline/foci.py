"""Lesion foci, pure: one lesion followed through a series.

Boxes on slices at most `FOCUS_SKIP` + 1 apart (linked all the way: no missing slice between) that overlap, each
grown by `FOCUS_GROW` × the larger side of its slice, join one focus (union-find over boxes): a tumour the model
marked on slices 13–15 and 17–18 is one focus, not two.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from appliance.domain import Rect, SliceFinding
from appliance.geometry import GAP_FACTOR, links, median_spacing, rect_array, slice_pairs

FOCUS_GROW = 0.02  # boxes on neighbouring slices within 2 % of the slice size of each other: the same focus
FOCUS_SKIP = 1  # ... also across this many slices without that box (present slices, not missing ones)


def focus_members(findings: Sequence[SliceFinding], gap_factor: float = GAP_FACTOR, grow: float = FOCUS_GROW,
                  skip: int = FOCUS_SKIP) -> list[list[tuple[int, int]]]:
    """The foci of findings sorted in series order, longest first (ties: the most superior): per focus, its
    members as (slice index, box index) in series order."""
    link = links([f.position for f in findings], gap_factor)
    ids = [(i, j) for i, f in enumerate(findings) for j in range(len(f.boxes))]
    parent = {k: k for k in ids}

    def root(k: tuple[int, int]) -> tuple[int, int]:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    if ids:
        slice_of = np.array([i for i, _ in ids])
        r = rect_array(findings[i].boxes[j].rect for i, j in ids)
        a, b = slice_pairs(slice_of, link, skip + 1)
        g = grow * np.array([max(f.shape) for f in findings], dtype=float)[slice_of[a]]  # the later slice's size
        touch = ((r[a, 0] - g < r[b, 2]) & (r[b, 0] - g < r[a, 2]) & (r[a, 1] - g < r[b, 3])
                 & (r[b, 1] - g < r[a, 3]))
        for x, y in zip(a[touch].tolist(), b[touch].tolist()):
            parent[root(ids[x])] = root(ids[y])
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k in ids:
        groups.setdefault(root(k), []).append(k)
    out = [sorted(g) for g in groups.values()]
    out.sort(key=lambda m: (m[0][0] - m[-1][0], m[0][0]))
    return out


def foci(findings: Sequence[SliceFinding], gap_factor: float = GAP_FACTOR, grow: float = FOCUS_GROW,
         skip: int = FOCUS_SKIP) -> list[tuple[int, int]]:
    """Lesion foci as (first slice, last slice) in series order, longest first."""
    return [(m[0][0], m[-1][0]) for m in focus_members(findings, gap_factor, grow, skip)]


def member_boxes(findings: Sequence[SliceFinding], members: Sequence[tuple[int, int]]) -> list[tuple[int, Rect]]:
    """A focus's members as (slice index, box rect)."""
    return [(i, findings[i].boxes[j].rect) for i, j in members]


def without_boxes(findings: Sequence[SliceFinding], drop: dict[int, set[int]]) -> list[SliceFinding]:
    """The findings with the boxes `drop` names ({slice index: box indices}) taken out (the foci a solid lesion or a
    mass explains, which the case rule does not count)."""
    return [f if i not in drop else dataclasses.replace(f, boxes=[b for j, b in enumerate(f.boxes)
                                                                  if j not in drop[i]])
            for i, f in enumerate(findings)]


def focus_size(findings: Sequence[SliceFinding], members: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(largest box side, length along z with one spacing) of a focus in mm; (0, 0) without a pixel size."""
    sides = [max(findings[i].boxes[j].rect.height, findings[i].boxes[j].rect.width) * findings[i].pixel_mm
             for i, j in members if findings[i].pixel_mm]
    if not sides:
        return 0.0, 0.0
    spacing = median_spacing([f.position for f in findings]) if len(findings) > 1 else 0.0
    first, last = members[0][0], members[-1][0]
    return max(sides), abs(findings[last].position - findings[first].position) + spacing
