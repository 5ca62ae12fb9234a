"""What a tile says about a verdict, pure: the flag, the case rule's finding in patient terms, the correction, the
viral-pneumonia-pattern grade and the solid nodules or masses that explained lesion runs.

The grade is of the *pattern* (RSNA consensus categories, Simpson et al. 2020): other viral and some bacterial
pneumonias share it, so a positive reads "COVID-19 pattern — isolate pending PCR", never "confirmed". Zones are
listed as the tile draws them: rows upper, middle, lower; in each row the patient's right first (the image's left,
as on the quadrant icon).
"""
from __future__ import annotations

import re
from typing import Any

from appliance.display.payloads import FINAL_STATES, QUADRANTS
from appliance.pipeline.anatomy import ANATOMY, patient_side, patient_terms

CATEGORY_WORDS = {"typical": "typical pattern", "indeterminate": "indeterminate pattern",
                  "atypical": "atypical pattern", "negative": "no pattern graded"}
ZONE_CELLS = (("right", "upper"), ("left", "upper"), ("right", "middle"), ("left", "middle"),
              ("right", "lower"), ("left", "lower"))
REGIONS = ("RUL", "RML", "RLL", "LUL", "LLL")
_DETAIL = re.compile(r"\s*\([^)]*\)|\s+\d+(?:\.\d+)?\s*%")  # "(8 foci)", "(right)", " 72 %": a reason's detail


def flag_of(verdict: dict[str, Any] | None) -> str:
    """The tile's flag: positive whatever the state; otherwise a final (or corrected) result, else pending."""
    if verdict is None:
        return "pending"
    if verdict["result"] == "positive":
        return "positive"
    if verdict["state"] not in FINAL_STATES:
        return "pending"
    return verdict["result"]


def finding_of(verdict: dict[str, Any] | None) -> dict[str, Any] | None:
    """The case rule's finding: the positive run (`evidence`), else the single focal lesion a negative names."""
    v = verdict or {}
    for kind in ("evidence", "focal"):
        run = v.get(kind)
        if isinstance(run, dict) and run.get("quadrant") in ANATOMY:
            return {"kind": kind, **{k: run[k] for k in ("quadrant", "first_slice", "last_slice", "run")}}
    return None


def slices_text(first: int, last: int) -> str:
    """0-based payload slices as people read them: "slices 113–132" (or "slice 7")."""
    return f"slice {first + 1}" if first == last else f"slices {first + 1}–{last + 1}"


def where_text(finding: dict[str, Any]) -> str:
    """The where-line, "patient's left posterior, slices 113–132" (payload slices 0-based; people read 1-based)."""
    return f"{patient_terms(finding['quadrant'])}, {slices_text(finding['first_slice'], finding['last_slice'])}"


def correction_view(v: dict[str, Any]) -> dict[str, Any] | None:
    """What a corrected verdict replaced, for the tile ("CORRECTED — was NEGATIVE" and what changed)."""
    c = v.get("correction")
    if v.get("state") != "corrected" or not isinstance(c, dict):
        return None
    return {"previous_result": c.get("previous_result"), "previous_state": c.get("previous_state"),
            "previous_created": c.get("previous_created"), "what": c.get("what") or ""}


def short_reason(reason: str) -> str:
    """A reason without its detail, for the tile line (the zone figure beside it shows the side; the whole reason
    is on tap): "peripheral 72 %" → "peripheral", "multifocal (8 foci)" → "multifocal", "unilateral (right)" →
    "unilateral"."""
    return _DETAIL.sub("", reason).strip() or reason


def _num(x: Any) -> float | None:
    return round(float(x), 1) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def grade_view(v: dict[str, Any]) -> dict[str, Any] | None:
    """The grade for the tile: category words, reasons (whole and short), severity, extent, and the six zone cells
    in drawing order with their % involved (None where the payload has no figure). None without a grade."""
    g = v.get("grade")
    if not isinstance(g, dict) or g.get("category") not in CATEGORY_WORDS:
        return None
    reasons = [str(r) for r in g.get("reasons") or []]
    zones = g.get("zones") if isinstance(g.get("zones"), dict) else {}
    extent = g.get("extent") if isinstance(g.get("extent"), dict) else {}
    regions = g.get("regions") if isinstance(g.get("regions"), dict) else {}
    severity = g.get("severity")
    return {
        "category": g["category"], "words": CATEGORY_WORDS[g["category"]], "reasons": reasons,
        "short": [short_reason(r) for r in reasons],
        "severity": severity if isinstance(severity, int) and not isinstance(severity, bool) else None,
        "regions": {r: regions[r] for r in REGIONS if isinstance(regions.get(r), int)},
        "extent": {k: p for k in ("right", "left", "total") if (p := _num(extent.get(k))) is not None},
        "zones": [{"side": side, "level": level, "pct": _num(zones.get(f"{side} {level}"))}
                  for side, level in ZONE_CELLS],
        "lesion_ml": _num(g.get("lesion_ml")), "ground_glass_pct": _num(g.get("ground_glass_pct")),
        "peripheral_pct": _num(g.get("peripheral_pct")),
    }


def other_text(o: dict[str, Any]) -> str:
    """The appliance's own words for a solid lesion, else words made from its fields."""
    if isinstance(o.get("text"), str) and o["text"].strip():
        return o["text"].strip()
    size = f" {o['diameter_mm']:.0f} mm" if isinstance(o.get("diameter_mm"), (int, float)) else ""
    side = patient_side(o.get("quadrant", "")).split()[0] if o.get("quadrant") in QUADRANTS else ""
    where = f", patient's {side} {o.get('zone', '')} zone".rstrip() if side else ""
    return f"solid {o.get('kind', 'lesion')}{size}{where} — not a COVID-19 pattern"


def others_view(v: dict[str, Any]) -> list[dict[str, Any]]:
    """Solid nodules or masses that explained lesion runs (they do not count toward a positive), largest first as
    the appliance sent them: kind, size, its text, and where with 1-based slices."""
    out = []
    for o in v.get("others") or []:
        if not isinstance(o, dict):
            continue
        first, last = o.get("first_slice"), o.get("last_slice")
        where = patient_terms(o["quadrant"]) if o.get("quadrant") in QUADRANTS else ""
        if isinstance(first, int) and isinstance(last, int):
            where = f"{where}, {slices_text(first, last)}" if where else slices_text(first, last)
        out.append({"kind": o.get("kind"), "diameter_mm": _num(o.get("diameter_mm")), "zone": o.get("zone"),
                    "text": other_text(o), "where": where or None})
    return out


def acquisition_view(v: dict[str, Any]) -> dict[str, Any] | None:
    """The series' noise note when it is outside the validated range (sharp kernel, low dose), else None: the
    technician should know that lesion boxes on such a scan are less reliable."""
    a = v.get("acquisition")
    if not isinstance(a, dict) or a.get("noisy") is not True:
        return None
    def fig(x: Any) -> float | None:
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    noise, limit = fig(a.get("noise")), fig(a.get("limit"))
    said = f" (noise {noise:.3f}" + (f", validated up to {limit:.3f})" if limit else ")") if noise is not None else ""
    smoothed = a.get("smoothed_slices")
    done = f"; {smoothed} slices smoothed before analysis" if isinstance(smoothed, int) and smoothed > 0 else ""
    return {"noise": noise, "limit": limit,
            "text": f"Noisy scan{said}: lesion boxes are less reliable — read with care{done}"}
