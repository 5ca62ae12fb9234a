"""appliance.pipeline.foci: lesion foci followed through a series (the vectorised grouping against a plain one)."""
from __future__ import annotations

import numpy as np

from appliance.domain import Box, Rect, SliceFinding
from appliance.geometry import links
from appliance.pipeline.foci import FOCUS_GROW, FOCUS_SKIP, foci, focus_members

from .reference import slice_groups


def reference_members(findings, gap_factor=1.5, grow=FOCUS_GROW, skip=FOCUS_SKIP):
    """The definition, box by box: boxes on slices ≤ skip + 1 apart, linked all the way, that touch once grown by
    grow × the later slice's size, are one focus; longest first, ties the most superior."""
    ids = [(i, j) for i, f in enumerate(findings) for j in range(len(f.boxes))]

    def touch(x: tuple[int, int], y: tuple[int, int]) -> bool:
        a, b, g = findings[x[0]].boxes[x[1]].rect, findings[y[0]].boxes[y[1]].rect, grow * max(findings[x[0]].shape)
        return a.y0 - g < b.y1 and b.y0 - g < a.y1 and a.x0 - g < b.x1 and b.x0 - g < a.x1

    out = slice_groups(ids, links([f.position for f in findings], gap_factor), skip + 1, touch)
    out.sort(key=lambda m: (m[0][0] - m[-1][0], m[0][0]))
    return out


def random_series(rng: np.random.Generator) -> list[SliceFinding]:
    n = int(rng.integers(1, 25))
    steps = rng.choice([2.0, 2.0, 2.0, 2.0, 7.0], size=n)  # a few missing slices
    positions = (100.0 - np.cumsum(steps)).tolist()
    out = []
    for i, p in enumerate(positions):
        boxes = []
        for _ in range(int(rng.choice([0, 0, 1, 2, 3]))):
            y, x = (int(v) for v in rng.integers(0, 200, size=2))
            h, w = (int(v) for v in rng.integers(3, 40, size=2))
            boxes.append(Box(Rect(y, x, y + h, x + w), 30.0, 0.9, "upper-left"))
        out.append(SliceFinding(f"s{i}", p, (256, 256), Rect(0, 0, 256, 256), boxes))
    return out


def test_focus_members_match_the_box_by_box_definition():
    rng = np.random.default_rng(7)
    for trial in range(60):
        findings = random_series(rng)
        for grow, skip in ((FOCUS_GROW, FOCUS_SKIP), (0.0, 0), (0.05, 2)):
            assert focus_members(findings, grow=grow, skip=skip) == reference_members(findings, grow=grow,
                                                                                       skip=skip), (trial, grow, skip)


def test_a_focus_bridges_one_slice_without_its_box_but_not_a_missing_slice():
    def f(i, pos, rects):
        return SliceFinding(f"s{i}", pos, (256, 256), Rect(0, 0, 256, 256),
                            [Box(r, 30.0, 0.9, "lower-left") for r in rects])

    patch = Rect(100, 100, 130, 130)
    bridged = [f(0, 10.0, [patch]), f(1, 8.0, []), f(2, 6.0, [patch])]
    assert foci(bridged) == [(0, 2)]
    gap = [f(0, 10.0, [patch]), f(1, 0.0, [patch]), f(2, -2.0, [patch]), f(3, -4.0, [])]  # 10 → 0: slices missing
    assert foci(gap) == [(1, 2), (0, 0)]
