"""appliance.geometry: series order, spacing, gaps, and the slice pairs the case rule links boxes over."""
from __future__ import annotations

import numpy as np

from appliance.geometry import links, median_spacing, rect_array, slice_pairs
from appliance.domain import Rect


def brute_pairs(slice_of: list[int], link: np.ndarray, max_step: int) -> set[tuple[int, int]]:
    out = set()
    for a, sa in enumerate(slice_of):
        for b, sb in enumerate(slice_of):
            if 1 <= sa - sb <= max_step and link[sb:sa].all():
                out.add((a, b))
    return out


def test_slice_pairs_match_every_pair_within_reach_and_never_across_a_gap() -> None:
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(1, 30))
        positions = np.cumsum(rng.choice([2.0, 2.0, 2.0, 9.0], size=n))[::-1]  # head → feet, a few gaps
        link = links(positions)
        slice_of = sorted(int(i) for i in rng.integers(0, n, size=int(rng.integers(0, 60))))
        for step in (1, 2, 3):
            a, b = slice_pairs(np.array(slice_of, dtype=int), link, step)
            got = list(zip(a.tolist(), b.tolist()))
            assert len(got) == len(set(got))  # no pair twice
            assert set(got) == brute_pairs(slice_of, link, step), (trial, step)


def test_slice_pairs_skip_a_missing_slice() -> None:
    link = links([10.0, 8.0, 6.0, 0.0, -2.0])  # 6 → 0: two slices missing
    assert link.tolist() == [True, True, False, True]
    a, b = slice_pairs(np.array([0, 1, 2, 3, 4]), link, 2)
    assert sorted(zip(a.tolist(), b.tolist())) == [(1, 0), (2, 0), (2, 1), (4, 3)]


def test_median_spacing_and_rect_array() -> None:
    assert median_spacing([5.0, 2.5, 0.0, -5.0]) == 2.5
    assert median_spacing([1.0]) == 0.0
    r = rect_array([Rect(1, 2, 3, 4), Rect(5, 6, 7, 8)])
    assert r.shape == (2, 4) and r[1].tolist() == [5, 6, 7, 8]
    assert rect_array([]).shape == (0, 4)
