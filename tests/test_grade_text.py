"""appliance.pipeline.grade_text: how a grade reads in the tables."""
from __future__ import annotations

from appliance.pipeline.grade_text import UNGRADED, pattern_text


def test_pattern_text_names_the_grade_or_why_there_is_none():
    g = {"category": "typical", "reasons": ["bilateral", "peripheral 81 %"], "severity": 7}
    assert pattern_text(g, "positive") == "typical 7/25"
    assert pattern_text(g, "positive", reasons=True) == "typical (bilateral, peripheral 81 %); severity 7/25"
    assert pattern_text(None, "positive") == "not graded (no HU)"
    assert pattern_text(None, "positive", reasons=True) == UNGRADED and "no HU" in UNGRADED
    assert pattern_text(g, "negative") is None and pattern_text(None, "indeterminate") is None
