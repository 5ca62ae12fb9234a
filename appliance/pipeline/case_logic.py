"""The case rule, pure: a series is positive when ≥ `min_run` consecutive slices show lesion in the same quadrant.

Consecutive means neighbours in position order with a gap ≤ 1.5 × the series' median spacing: a missing slice
breaks a run. Optionally (`min_run_mm`, on by default in the appliance) the run must also cover a minimum extent
along z, so that 3 slices of 0.6 mm (a 2 mm vessel segment) do not count like 3 slices of 5 mm. Slices without lung count as negative (they break runs like any slice without lesion).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from appliance.domain import QUADRANTS, Evidence, SeriesVerdict, SliceFinding
from appliance.ingest.series import GAP_FACTOR, links, median_spacing

MIN_RUN = 3


def quadrant_of(cy: float, cx: float, lung_cy: float, lung_cx: float) -> str:
    """Quadrant of a point relative to the lung box centre, in display orientation (upper = anterior)."""
    vert = "upper" if cy < lung_cy else "lower"
    horiz = "left" if cx < lung_cx else "right"
    return f"{vert}-{horiz}"


def longest_runs(findings: Sequence[SliceFinding], gap_factor: float = GAP_FACTOR) -> dict[str, tuple[int, int]]:
    """For each quadrant, the longest run as (first index, length) over findings sorted in series order."""
    link = links([f.position for f in findings], gap_factor)
    best: dict[str, tuple[int, int]] = {}
    for q in QUADRANTS:
        start, length = 0, 0
        for i, f in enumerate(findings):
            if q in f.quadrants:
                if length and link[i - 1]:
                    length += 1
                else:
                    start, length = i, 1
                if length > best.get(q, (0, 0))[1]:
                    best[q] = (start, length)
            else:
                length = 0
    return best


def find_evidence(findings: Sequence[SliceFinding], min_run: int = MIN_RUN,
                  gap_factor: float = GAP_FACTOR, min_run_mm: float = 0.0) -> Evidence | None:
    """The longest qualifying run (ties: the most superior), or None.

    A run qualifies with ≥ `min_run` slices that also cover ≥ `min_run_mm` along z (run × median spacing), so
    that thin-slice series need as much lesion extent as thick ones; 0 disables the extent check.
    """
    runs = longest_runs(findings, gap_factor)
    spacing = median_spacing([f.position for f in findings]) if min_run_mm > 0 else 0.0
    need = max(min_run, int(math.ceil(min_run_mm / spacing - 1e-9))) if spacing > 0 else min_run
    cands = [(length, -start, q) for q, (start, length) in runs.items() if length >= need]
    if not cands:
        return None
    length, neg_start, q = max(cands)
    start = -neg_start
    return Evidence(quadrant=q, first_slice=start, last_slice=start + length - 1, run=length)  # type: ignore[arg-type]


def decide(findings: Sequence[SliceFinding], *, final: bool = True, min_run: int = MIN_RUN,
           min_slices: int = 0, gap_factor: float = GAP_FACTOR, min_run_mm: float = 0.0) -> SeriesVerdict:
    """Verdict for findings sorted in series order.

    positive: a run fired. negative: no run, at least `min_slices` slices and some lung seen. Otherwise
    indeterminate, with the reason. A verdict before the series is complete is `provisional`.
    """
    ev = find_evidence(findings, min_run, gap_factor, min_run_mm)
    n = len(findings)
    lung = sum(1 for f in findings if f.lung is not None)
    lesion = sum(1 for f in findings if f.has_lesion)
    gaps = int((~links([f.position for f in findings], gap_factor)).sum()) if n > 1 else 0
    reason = None
    if ev is not None:
        result = "positive"
    elif n < min_slices:
        result, reason = "indeterminate", f"only {n} slice(s), fewer than the {min_slices} needed for a negative"
    elif lung == 0:
        result, reason = "indeterminate", "no lung found on any slice (not a chest series?)"
    else:
        result = "negative"
    return SeriesVerdict(result=result, state="final" if final else "provisional", evidence=ev, slices=n,
                         lung_slices=lung, lesion_slices=lesion, reason=reason, gaps=gaps)
