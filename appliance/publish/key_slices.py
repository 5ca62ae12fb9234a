"""Key slices of a series: the slices with lesion boxes, best first (the overlay message, the PACS SR and key image,
`ctriage analyze` reports)."""
from __future__ import annotations

from appliance.domain import SliceFinding


def key_slices(findings: list[SliceFinding], limit: int = 12) -> list[dict]:
    """Slices with lesion (series index, quadrants, boxes normalised to [0, 1], best score), best first."""
    out = []
    for i, f in enumerate(findings):
        if f.boxes:
            out.append({"index": i, "quadrants": sorted(f.quadrants), "score": round(max(b.score for b in f.boxes), 4),
                        "boxes": [{"box": b.normalised(f.shape), "quadrant": b.quadrant, "score": b.score,
                                   "area_px512": b.area_512} for b in f.boxes]})
    out.sort(key=lambda d: -d["score"])
    return out[:limit]
