"""Image quadrants in patient terms, pure.

Slices are analysed in radiological display orientation (DICOM LPS rows/columns as the console shows them):
the top of the image is the patient's anterior side and the image's left is the patient's right. The case rule
speaks of image quadrants ("upper-left"); people read patient sides ("patient's right anterior").
"""
from __future__ import annotations

from collections.abc import Sequence

#: image quadrant → patient side, in the order the display lists them
ANATOMY: dict[str, str] = {"upper-left": "right anterior", "upper-right": "left anterior",
                           "lower-left": "right posterior", "lower-right": "left posterior"}


def patient_side(quadrant: str) -> str:
    """'lower-right' → 'left posterior' (unknown names come back unchanged)."""
    return ANATOMY.get(quadrant, quadrant)


def patient_terms(quadrant: str) -> str:
    """'lower-right' → "patient's left posterior" (unknown names come back unchanged)."""
    side = ANATOMY.get(quadrant)
    return f"patient's {side}" if side else quadrant


def run_text(quadrant: str, first_slice: int, last_slice: int, run: int | None = None) -> str:
    """A lesion run for people: "patient's left posterior (image lower-right), slices 12-17 (run 6)".
    first_slice/last_slice are 0-based positions in series order, as in payloads and JSON; people read 1-based."""
    where = patient_terms(quadrant)
    where = f"{where} (image {quadrant})" if where != quadrant else quadrant
    tail = f" (run {run})" if run is not None else ""
    return f"{where}, slices {first_slice + 1}-{last_slice + 1}{tail}"


def quadrant_of(cy: float, cx: float, lung_cy: float, lung_cx: float) -> str:
    """Image quadrant of a point relative to the lung box centre, in display orientation (upper = anterior)."""
    vert = "upper" if cy < lung_cy else "lower"
    horiz = "left" if cx < lung_cx else "right"
    return f"{vert}-{horiz}"


def zone_of(position: float, lung_positions: Sequence[float]) -> str:
    """Third of the lung's z-extent (head → feet) that `position` lies in: 'upper', 'middle' or 'lower'
    ('middle' when fewer than two slices show lung)."""
    if len(lung_positions) < 2:
        return "middle"
    top, bottom = max(lung_positions), min(lung_positions)
    t = (top - position) / max(top - bottom, 1e-6)
    return "upper" if t < 1 / 3 else ("middle" if t < 2 / 3 else "lower")
