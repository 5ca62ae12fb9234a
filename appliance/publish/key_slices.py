"""Key slices of a series: the slices with lesion boxes, best first (the overlay message, the PACS SR and key image,
`ctriage analyze` reports). The key image is the first: the slice of the finding the verdict names, when it names one."""
from __future__ import annotations

from typing import Any

from appliance.domain import Evidence, SliceFinding


def largest_box_slice(findings: list[SliceFinding], first: int, last: int, quadrant: str | None) -> int:
    """The slice in [first, last] whose largest box (in `quadrant`, if given) is largest (ties: the higher score);
    the middle one if none."""
    best, best_key = (first + last) // 2, (0, 0.0)
    for i in range(max(first, 0), min(last, len(findings) - 1) + 1):
        for b in findings[i].boxes:
            key = (b.rect.height * b.rect.width, b.score)
            if (quadrant is None or b.quadrant == quadrant) and key > best_key:
                best, best_key = i, key
    return best


def lead_run(verdict: Any) -> Evidence | None:
    """The run a verdict names (a SeriesVerdict or its payload dict): the run that fired, else the focal lesion."""
    get = verdict.get if isinstance(verdict, dict) else lambda k: getattr(verdict, k, None)
    for run in (get("evidence"), get("focal")):
        if isinstance(run, dict):
            return Evidence(quadrant=run["quadrant"], first_slice=int(run["first_slice"]),
                            last_slice=int(run["last_slice"]), run=int(run.get("run", 0)))
        if run is not None:
            return run
    return None


def key_slices(findings: list[SliceFinding], limit: int = 12, lead: Evidence | None = None) -> list[dict]:
    """Slices with lesion (series index, quadrants, boxes normalised to [0, 1], best score), best first — with a
    `lead` run (`lead_run` of the verdict), its slice with the largest box in its quadrant first: the key image
    shows what the verdict names (a lung cancer's mass, not a brighter stray patch elsewhere)."""
    out = []
    for i, f in enumerate(findings):
        if f.boxes:
            out.append({"index": i, "quadrants": sorted(f.quadrants), "score": round(max(b.score for b in f.boxes), 4),
                        "boxes": [{"box": b.normalised(f.shape), "quadrant": b.quadrant, "score": b.score,
                                   "area_px512": b.area_512} for b in f.boxes]})
    out.sort(key=lambda d: -d["score"])
    if lead is not None and out:
        first = largest_box_slice(findings, lead.first_slice, lead.last_slice, lead.quadrant)
        out.sort(key=lambda d: d["index"] != first)  # stable: the rest stay best first
    return out[:limit]
