"""Series assembly: group slices by SeriesInstanceUID, order along the slice normal, find gaps.

Order is head → feet (descending position along a head-pointing normal), never InstanceNumber alone.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from appliance.domain import SliceImage
# the slice geometry lives in appliance.geometry (the case rule uses it too); importable here for ingest callers
from appliance.geometry import GAP_FACTOR, links, median_spacing, sort_key  # noqa: F401


def _identities(s: SliceImage) -> list[tuple]:
    """What makes two slices the same: the SOP instance UID, or the same file at the same position."""
    return ([("sop", s.sop_uid)] if s.sop_uid else []) + [("file", s.position, s.key)]


@dataclass
class Series:
    """The slices of one series, kept sorted; duplicates (same SOP instance or same position) are dropped."""

    uid: str
    study_uid: str
    slices: list[SliceImage] = field(default_factory=list)
    duplicates: int = 0
    _seen: set = field(default_factory=set, repr=False, compare=False)

    def add(self, s: SliceImage) -> bool:
        """Insert in order; False when it duplicates a slice already held."""
        if not self._seen and self.slices:  # slices given to the constructor
            for o in self.slices:
                self._seen.update(_identities(o))
        ids = _identities(s)
        if any(i in self._seen for i in ids):
            self.duplicates += 1
            return False
        self._seen.update(ids)
        bisect.insort(self.slices, s, key=sort_key)
        return True

    @property
    def positions(self) -> list[float]:
        return [s.position for s in self.slices]

    @property
    def gaps(self) -> int:
        """Number of breaks in the sequence (missing slices)."""
        return int((~links(self.positions)).sum())

    @property
    def spacing(self) -> float:
        return median_spacing(self.positions)

    @property
    def description(self) -> str:
        return self.slices[0].series_description if self.slices else ""


def group_series(slices: list[SliceImage]) -> list[Series]:
    """Group by SeriesInstanceUID (first-seen order), each sorted head → feet."""
    out: dict[str, Series] = {}
    for s in slices:
        ser = out.setdefault(s.series_uid, Series(s.series_uid, s.study_uid))
        ser.add(s)
    return list(out.values())
