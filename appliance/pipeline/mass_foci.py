"""Lesion foci that are the halo of a mass, pure: a focus whose own boxes wrap a mass-sized soft-tissue core
(appliance.pipeline.halo_core) and that is about as long along z as it is wide is a mass, not a COVID-19 focus.

The case rule (appliance.pipeline.case_logic) takes such foci out of the count, as it does the halo of a solid nodule
or mass (appliance.pipeline.solid_lesions), and names each a solid mass: a lung cancer beside one stray patch of
ground glass is then one focal lesion and a mass, not the multifocal pattern. Two checks keep COVID-19
foci counted where their hull holds soft tissue too: the core's slice must be mostly clear lung (diffuse disease
wraps the hila: `focal_slice`), and the focus about as long along z as it is wide (a consolidation lining the heart
or the liver dome runs over many slices; a mass is round, its halo reaches about as far along z as across).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.domain import Core, Evidence, SliceFinding
from appliance.geometry import GAP_FACTOR
from appliance.pipeline.anatomy import zone_of
from appliance.pipeline.foci import focus_members, focus_size, without_boxes
from appliance.pipeline.halo_core import is_mass_core
from appliance.pipeline.solid_lesions import SolidLesion

MAX_SLICE_LESION = 0.2  # a mass lies in a mostly clear lung: lesion ≤ this share of both lungs on its core's slice
MASS_Z_RATIO = 1.5  # a mass' focus is at most this × its largest box side long along z (A0001: 0.63–1.19 in its rewrites)


@dataclass(frozen=True)
class MassFocus:
    """A lesion focus named a mass: the mass (`others`), the focus as a run (`focal`) and its largest core."""

    mass: SolidLesion
    run: Evidence
    core: Core


def focal_slice(finding: SliceFinding) -> bool:
    """Whether the slice's lesion is focal enough for a core on it to be a mass: lesion covers at most
    `MAX_SLICE_LESION` of both lungs. Diffuse disease wraps the hila and the heart border too: on COVID-19-NY-SBU
    slices with bilateral COVID-19 the hull of a lesion holds mass-sized soft tissue (the hilum, 390–1,440 mm²)
    where lesion covers 40–100 % of the lungs; on A0001's tumour slices 11 %."""
    m = finding.measures
    return m is not None and m.lung > 0 and m.lesion <= MAX_SLICE_LESION * m.lung


def mass_core(findings: Sequence[SliceFinding], members: Sequence[tuple[int, int]]) -> Core | None:
    """The largest halo-wrapped core large enough to make a lesion a mass whose centre lies in one of the
    `members`' boxes ((slice index, box index)) on a `focal_slice`, or None."""
    best = None
    for i, j in members:
        if not focal_slice(findings[i]):
            continue
        r = findings[i].boxes[j].rect
        for c in findings[i].cores:
            cy, cx = c.rect.center
            if is_mass_core(c) and r.y0 <= cy < r.y1 and r.x0 <= cx < r.x1:
                if best is None or c.area_mm2 > best.area_mm2:
                    best = c
    return best


def focus_mass(findings: Sequence[SliceFinding], members: Sequence[tuple[int, int]], core: Core) -> SolidLesion:
    """A lesion focus (members: (slice index, box index), series order) named a mass for its `core`: first to last
    slice, the quadrant of its largest box, its largest box side (halo included), the zone at its middle slice."""
    first, last = members[0][0], members[-1][0]
    big = max((findings[i].boxes[j] for i, j in members), key=lambda b: b.rect.height * b.rect.width)
    size, length = focus_size(findings, members)
    middle = findings[first + (last - first + 1) // 2].position
    zone = zone_of(middle, [f.position for f in findings if f.lung is not None])
    return SolidLesion(kind="mass", diameter_mm=round(size, 1), first_slice=first, last_slice=last,
                       quadrant=big.quadrant, zone=zone, mean_hu=core.mean_hu, z_mm=round(length, 1))


def explain_masses(findings: Sequence[SliceFinding], need: int,
                   gap_factor: float = GAP_FACTOR) -> tuple[list[SliceFinding], list[MassFocus]]:
    """(findings without the boxes of foci that are a mass' halo, those foci named masses, largest first).

    A focus is a mass' halo when it spans at least `need` slices (a focus the case rule would count), one of its
    own boxes holds a mass-sized core (`mass_core`), and it is at most `MASS_Z_RATIO` × its largest box side long
    along z. Its run is reported in the quadrant of its largest box, from its first to its last slice."""
    drop: dict[int, set[int]] = {}
    out: list[MassFocus] = []
    for m in focus_members(findings, gap_factor):
        if m[-1][0] - m[0][0] + 1 < need or (core := mass_core(findings, m)) is None:
            continue
        size, length = focus_size(findings, m)
        if length > MASS_Z_RATIO * size:
            continue
        mass = focus_mass(findings, m, core)
        out.append(MassFocus(mass, Evidence(quadrant=mass.quadrant, first_slice=m[0][0],  # type: ignore[arg-type]
                                            last_slice=m[-1][0], run=m[-1][0] - m[0][0] + 1), core))
        for i, j in m:
            drop.setdefault(i, set()).add(j)
    out.sort(key=lambda mf: (-mf.mass.diameter_mm, mf.mass.first_slice))
    return without_boxes(findings, drop), out
