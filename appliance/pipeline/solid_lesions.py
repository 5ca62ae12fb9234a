"""Solid lesions of a series, pure: components of `appliance.pipeline.solid` followed from slice to slice into
nodules and masses, and the lesion foci they explain.

Per series (`link_solids`): components on neighbouring slices that overlap form one object; objects attached on
half of their slices or more, vessel-like ones and ones not round in 3-D are dropped; what remains is a
`SolidLesion`, a nodule (< 30 mm) or a mass. `explain` says whether a lesion focus of the case rule is the halo
around one of them; `explain_foci` applies that to a whole series for the case rule.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.domain import Rect, Solid, SliceFinding
from appliance.geometry import GAP_FACTOR, links, median_spacing, rect_array, slice_pairs
from appliance.pipeline.anatomy import patient_side, quadrant_of, zone_of
from appliance.pipeline.foci import FOCUS_GROW, FOCUS_SKIP, focus_members as _members, member_boxes, without_boxes
from appliance.pipeline.solid import MIN_DIAMETER_MM, SECTION_MM

MAX_RIM_AIR = 0.3  # a lesion's sections have (median) at most this share of aerated rim: a halo or spicules
MASS_MM = 30.0  # nodule below, mass from this diameter (Fleischner glossary)
MAX_DRIFT = 0.75  # a vessel moves: centres further than this × the diameter from the largest section's centre
MAX_Z_RATIO = 3.0  # z-extent / in-plane diameter of a round object is below this (a vessel along z: far above)
ROUND_Z = 0.7  # ... and the z-extent at least this × the span over which a sphere of that diameter shows sections
MAX_MEAN_HU = 150.0  # denser on average: a contrast-filled vessel or a calcification, not a soft-tissue nodule
HALO_FACTOR = 0.5  # explain: a solid's rect grown by this × its larger side (at least HALO_MIN_MM) ...
HALO_MIN_MM = 10.0  # ... is where its halo lies
EXPLAIN_SHARE = 0.5  # ... a focus is explained when at least this share of its boxes lie there


@dataclass(frozen=True)
class SolidLesion:
    """A solid nodule or mass followed through the series; slices are 0-based positions in series order.

    members: (slice index, index into that slice's solids) of its sections.
    """

    kind: str  # "nodule" (< 30 mm) | "mass"
    diameter_mm: float  # largest in-plane diameter over its sections
    first_slice: int
    last_slice: int
    quadrant: str  # image quadrant of its largest section, relative to that slice's lung box centre
    zone: str  # "upper" | "middle" | "lower" third of the lung's z-extent
    mean_hu: float
    z_mm: float = 0.0  # extent along z
    members: tuple[tuple[int, int], ...] = ()

    @property
    def side(self) -> str:
        """The patient's side: 'right' or 'left'."""
        return patient_side(self.quadrant).split()[0]

    def describe(self) -> str:
        """'solid mass 32 mm, patient's right upper zone — not a COVID-19 pattern'."""
        return (f"solid {self.kind} {self.diameter_mm:.0f} mm, patient's {self.side} {self.zone} zone"
                " — not a COVID-19 pattern")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "diameter_mm": round(self.diameter_mm, 1), "first_slice": self.first_slice,
                "last_slice": self.last_slice, "quadrant": self.quadrant, "zone": self.zone,
                "mean_hu": round(self.mean_hu), "z_mm": round(self.z_mm, 1), "text": self.describe()}


# --- per slice -----------------------------------------------------------------------------------------------


def overlap_share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the smaller rect's area, pairwise for rects as equal-length `rect_array`s."""
    h = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    w = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    smaller = np.maximum(1.0, np.minimum((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]),
                                         (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
    return np.where((h > 0) & (w > 0), h * w / smaller, 0.0)


def link_solids(per_slice: Sequence[Sequence[Solid]], positions: Sequence[float],
                lungs: Sequence[Rect | None] | None = None, gap_factor: float = GAP_FACTOR,
                min_overlap: float = 0.2, skip: int = 2) -> list[SolidLesion]:
    """Solid lesions of a series (slices in series order, head → feet), largest first.

    Components on neighbouring slices (no missing slice between, also across `skip` slice(s) where the section
    was not found: a nodule on the pleura leaves the envelope on a slice) whose rects overlap by ≥ `min_overlap`
    of the smaller one form one object (union-find). An object is dropped when it is
    - below `MIN_DIAMETER_MM`, or seen on one slice only (its shape in 3-D cannot be judged: a vessel crossing a
      thick slice looks the same),
    - attached on at least half of its slices (the chest wall, the mediastinum, a pleural-based lesion),
    - vessel-like: its centre moves more than `MAX_DRIFT` × its diameter away from its largest section, its
      mean density is that of contrast-filled blood or calcium (> `MAX_MEAN_HU`), or its rim is mostly aerated
      lung (median `rim_air` > `MAX_RIM_AIR`: a vessel crosses aerated lung with a sharp edge, while the nodules
      and masses that matter here have the ground-glass halo or spicules the lesion model marks), or
    - not round in 3-D: its z-extent (first to last slice, plus one spacing) above `MAX_Z_RATIO` × its in-plane
      diameter (a vessel along z), or below `ROUND_Z` × the z-span over which a sphere of that diameter shows
      sections ≥ `SECTION_MM` (a flat partial-volume sliver, a vessel junction on two thin slices).
    lungs: each slice's lung box (quadrant relative to its centre; zone within the slices that have one).
    """
    n = len(per_slice)
    link = links(list(positions), gap_factor) if n > 1 else np.zeros(0, bool)
    spacing = median_spacing(list(positions)) if n > 1 else 0.0
    ids = [(i, k) for i in range(n) for k in range(len(per_slice[i]))]
    parent = {x: x for x in ids}

    def root(x: tuple[int, int]) -> tuple[int, int]:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if ids:  # the previous slice, or across `skip` slice(s) without the section
        r = rect_array(per_slice[i][k].rect for i, k in ids)
        a, b = slice_pairs(np.array([i for i, _ in ids]), link, skip + 1)
        hit = overlap_share(r[a], r[b]) >= min_overlap
        for x, y in zip(a[hit].tolist(), b[hit].tolist()):
            parent[root(ids[x])] = root(ids[y])
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for x in ids:
        groups.setdefault(root(x), []).append(x)
    lung_pos = list(positions) if lungs is None else [p for p, lung in zip(positions, lungs) if lung is not None]
    out = []
    for members in groups.values():
        lesion = _lesion(sorted(members), per_slice, positions, lungs, lung_pos, spacing)
        if lesion is not None:
            out.append(lesion)
    out.sort(key=lambda s: (-s.diameter_mm, s.first_slice))
    return out


def _sphere_span(d: float) -> float:
    """z-span over which a sphere of diameter d shows sections of at least `SECTION_MM`."""
    return math.sqrt(max(d * d - SECTION_MM ** 2, 0.0))


def _lesion(members: list[tuple[int, int]], per_slice: Sequence[Sequence[Solid]], positions: Sequence[float],
            lungs: Sequence[Rect | None] | None, lung_pos: Sequence[float], spacing: float) -> SolidLesion | None:
    """The object made of `members`, or None when `link_solids` drops it."""
    slices = sorted({i for i, _ in members})
    attached = {i for i, k in members if per_slice[i][k].attached}
    if len(slices) < 2 or len(attached) * 2 >= len(slices):
        return None
    parts = [(i, per_slice[i][k]) for i, k in members]
    big_i, big = max(parts, key=lambda p: p[1].area_mm2)
    d = max(s.diameter_mm for _, s in parts)
    if d < MIN_DIAMETER_MM:
        return None
    cy, cx = big.rect.center
    drift = max(math.hypot(s.rect.center[0] - cy, s.rect.center[1] - cx) * s.pixel_mm for _, s in parts)
    if drift > MAX_DRIFT * d:
        return None
    z = abs(positions[slices[-1]] - positions[slices[0]]) + (spacing or 0.0)
    if spacing > 0 and not (ROUND_Z * _sphere_span(d) <= z <= MAX_Z_RATIO * d):
        return None
    lung = lungs[big_i] if lungs is not None else None
    ly, lx = lung.center if lung is not None else (cy, cx)
    quadrant = quadrant_of(cy, cx, ly, lx)
    area = sum(s.area_mm2 for _, s in parts)
    mean_hu = sum(s.mean_hu * s.area_mm2 for _, s in parts) / max(area, 1e-6)
    if mean_hu > MAX_MEAN_HU or float(np.median([s.rim_air for _, s in parts])) > MAX_RIM_AIR:
        return None
    return SolidLesion(kind="mass" if d >= MASS_MM else "nodule", diameter_mm=round(d, 1),
                       first_slice=slices[0], last_slice=slices[-1], quadrant=quadrant,
                       zone=zone_of(positions[big_i], lung_pos), mean_hu=round(mean_hu, 1), z_mm=round(z, 1),
                       members=tuple(members))


def _grown(s: Solid) -> Rect:
    """The solid's rect grown on every side by its halo margin (`HALO_FACTOR` × its larger side, at least
    `HALO_MIN_MM`)."""
    g = max(HALO_FACTOR * max(s.rect.height, s.rect.width), HALO_MIN_MM / max(s.pixel_mm, 1e-3))
    r = s.rect
    return Rect(int(r.y0 - g), int(r.x0 - g), int(math.ceil(r.y1 + g)), int(math.ceil(r.x1 + g)))


def _inside(box: Rect, region: Rect) -> float:
    """Share of `box`'s area inside `region`."""
    h = min(box.y1, region.y1) - max(box.y0, region.y0)
    w = min(box.x1, region.x1) - max(box.x0, region.x0)
    return max(h, 0) * max(w, 0) / max(1, box.height * box.width)


def halos(lesion: SolidLesion, per_slice: Sequence[Sequence[Solid]]) -> dict[int, list[Rect]]:
    """A solid lesion's sections grown by their halo margin (`_grown`), per slice index."""
    sections: dict[int, list[Rect]] = {}
    for i, k in lesion.members:
        sections.setdefault(i, []).append(_grown(per_slice[i][k]))
    return sections


def explain(focus_members: Sequence[tuple[int, Rect]], solids: Sequence[SolidLesion],
            per_slice: Sequence[Sequence[Solid]],
            cache: dict[int, dict[int, list[Rect]]] | None = None) -> SolidLesion | None:
    """The solid lesion whose halo a lesion focus is, or None.

    Geometry: a focus box (slice i, rect) lies on/around a solid lesion when at least half of the box's area
    lies inside the rect of one of the lesion's sections on slice i − 1, i or i + 1, grown on every side by
    `HALO_FACTOR` × that section's larger side (at least `HALO_MIN_MM`): the ground-glass halo and spicules of a
    nodule or mass reach about that far, and the lesion model marks them one slice beyond the solid core too.
    The focus is explained when at least `EXPLAIN_SHARE` of its boxes lie on/around the lesion (the one with
    the most, on ties the larger). A wide patch of ground glass that merely contains a small nodule is not
    explained: most of its box lies outside the nodule's halo. `cache` ({} to start): the halos of `solids` by
    position, kept between calls for the foci of one series.
    """
    if not focus_members:
        return None
    best, best_n = None, 0
    lo, hi = min(i for i, _ in focus_members) - 1, max(i for i, _ in focus_members) + 1
    cache = {} if cache is None else cache
    for n, lesion in enumerate(solids):
        if lesion.last_slice < lo or lesion.first_slice > hi:
            continue  # no section on or beside the focus' slices: no hit
        sections = cache.get(n)
        if sections is None:
            sections = cache[n] = halos(lesion, per_slice)
        hits = sum(1 for i, box in focus_members
                   if any(_inside(box, g) >= 0.5 for j in (i - 1, i, i + 1) for g in sections.get(j, ())))
        if hits > best_n or (hits == best_n and best is not None and lesion.diameter_mm > best.diameter_mm):
            best, best_n = lesion, hits
    if best is None or best_n < EXPLAIN_SHARE * len(focus_members):
        return None
    return best


def focus_members(findings: Sequence[SliceFinding], gap_factor: float = GAP_FACTOR, grow: float = FOCUS_GROW,
                  skip: int = FOCUS_SKIP) -> list[list[tuple[int, Rect]]]:
    """The lesion foci (appliance.pipeline.foci) with their members as (slice index, box rect), longest first."""
    return [member_boxes(findings, m) for m in _members(findings, gap_factor, grow, skip)]


def explain_foci(findings: Sequence[SliceFinding],
                 gap_factor: float = GAP_FACTOR) -> tuple[list[SliceFinding], list[SolidLesion]]:
    """(findings without the boxes of foci that solid lesions explain, the solid lesions that explain some).

    The case rule then counts runs and foci on what is left: a tumour's or nodule's halo does not make a series
    COVID-19-positive, and the lesions that explained it are named in the verdict."""
    per_slice = [f.solids for f in findings]
    if not any(per_slice):
        return list(findings), []
    lesions = link_solids(per_slice, [f.position for f in findings], [f.lung for f in findings], gap_factor)
    if not lesions:
        return list(findings), []
    drop: dict[int, set[int]] = {}
    named: list[SolidLesion] = []
    cache: dict[int, dict[int, list[Rect]]] = {}
    for members in _members(findings, gap_factor):
        lesion = explain(member_boxes(findings, members), lesions, per_slice, cache)
        if lesion is None:
            continue
        if lesion not in named:
            named.append(lesion)
        for i, j in members:
            drop.setdefault(i, set()).add(j)
    if not named:
        return list(findings), []
    return without_boxes(findings, drop), sorted(named, key=lambda s: (-s.diameter_mm, s.first_slice))
