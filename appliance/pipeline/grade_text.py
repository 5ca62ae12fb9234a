"""How a series' grade reads in a table, pure and light (no numpy: the CLI tables import it at start-up).

The grade itself is measured in `appliance.pipeline.grading`; this only words the dict a verdict carries.
"""
from __future__ import annotations

from typing import Any

UNGRADED = "not graded: no HU (lung-window crop images carry no density or pixel size to measure)"


def pattern_text(grade: dict[str, Any] | None, result: str, *, reasons: bool = False) -> str | None:
    """A verdict's grade in one phrase, for tables: 'typical 6/25' (with `reasons`: 'typical (bilateral, …);
    severity 6/25'); for a positive without a grade (its slices had no HU to measure) 'not graded (no HU)' (with
    `reasons`: `UNGRADED`); None when the result is not positive (only positives are graded for the reader)."""
    if result != "positive":
        return None
    if not grade:
        return UNGRADED if reasons else "not graded (no HU)"
    if reasons:
        return f"{grade['category']} ({', '.join(grade.get('reasons', []))}); severity {grade['severity']}/25"
    return f"{grade['category']} {grade['severity']}/25"
