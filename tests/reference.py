"""Plain reference definitions the vectorised pipeline code is checked against (tests only)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def slice_groups(ids: Sequence[tuple[int, int]], link: np.ndarray, reach: int,
                 joined: Callable[[tuple[int, int], tuple[int, int]], bool]) -> list[list[tuple[int, int]]]:
    """Items (slice index, item index) grouped item by item: a on a slice 1 … `reach` after b's, every slice
    between linked (`links`), and `joined(a, b)` — one group. Groups in order of their first item, sorted."""
    group = {x: {x} for x in ids}
    for a in ids:
        for b in ids:
            if 1 <= a[0] - b[0] <= reach and link[b[0]:a[0]].all() and joined(a, b):
                merged = group[a] | group[b]
                for x in merged:
                    group[x] = merged
    out, seen = [], set()
    for x in ids:
        if x not in seen:
            seen |= group[x]
            out.append(sorted(group[x]))
    return out
