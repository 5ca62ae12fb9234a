"""Series tracker, pure: each series' findings kept in position order as slices arrive (in any order), the case
rule re-applied on the sorted set after every batch, completeness signals, and the study verdict over its series.

No I/O and no clock: callers pass `now` (seconds, any monotonic-enough clock; the daemon uses wall time so the
quiet timer survives a restart). A series emits at most:
  * `provisional` updates when the provisional result changes to positive (the rule fired mid-series) or away
    from positive again (a late slice broke the run: slices arrive out of order, so the rule is re-checked on the
    sorted set);
  * one `final` update when it is complete: expected slice count reached, a completion hint (end marker,
    association released), more series in flight than allowed, or a quiet time without new slices — the longer
    `partial_quiet_seconds` when the slices so far look like part of a series (`appliance.pipeline.coverage`:
    the lung goes on past an end slice, or slices are missing in between), so that a paused export does not
    make the verdict final on half the lung.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from appliance.domain import SeriesVerdict, SliceFinding
from appliance.pipeline.case_logic import CaseRule, decide
from appliance.pipeline.coverage import ENDED_LUNG_SHARE, lung_areas, partial_reason

UpdateKind = Literal["provisional", "final"]


@dataclass
class Arrival:
    """One analysed slice handed to the tracker. `order` is `appliance.ingest.series.sort_key` of the slice."""

    series_uid: str
    study_uid: str
    order: tuple
    finding: SliceFinding
    ident: str  # SOPInstanceUID (or content hash): duplicates are ignored
    expected: int | None = None  # slices announced by the header (ImagesInAcquisition), when given
    description: str = ""
    arrived: float | None = None  # when the file reached the appliance (else: when it was analysed)


@dataclass
class Update:
    series_uid: str
    kind: UpdateKind
    verdict: SeriesVerdict
    complete_reason: str | None = None  # final only: why the series was declared complete


@dataclass
class TrackedSeries:
    uid: str
    study_uid: str
    first_seen: float
    last_seen: float
    description: str = ""
    expected: int | None = None
    orders: list[tuple] = field(default_factory=list)
    findings: list[SliceFinding] = field(default_factory=list)  # series order (head → feet)
    ids: set[str] = field(default_factory=set)
    announced: str | None = None  # provisional result last announced (None: nothing announced yet)
    hint: str | None = None  # pending completion signal
    hint_weak: bool = False  # the signal may come before the series is whole (a sender's association released)
    partial: str | None = None  # once quiet: why the slices look like part of a series ("": they look whole)

    def add(self, order: tuple, finding: SliceFinding, ident: str) -> bool:
        """Insert in series order; False for a duplicate."""
        if ident in self.ids:
            return False
        i = bisect.bisect_right(self.orders, order)
        self.orders.insert(i, order)
        self.findings.insert(i, finding)
        self.ids.add(ident)
        self.partial = None  # judged again at the next quiet time
        return True

    @property
    def count(self) -> int:
        return len(self.findings)


class SeriesTracker:
    """Open series and when they complete; `rule` is the case rule every caller shares (`CaseRule.from_config`).

    partial_quiet_seconds: the quiet time for a series whose slices look like part of one (None or not longer
    than quiet_seconds: the same quiet time for every series).
    """

    def __init__(self, rule: CaseRule, *, quiet_seconds: float, max_open: int,
                 partial_quiet_seconds: float | None = None) -> None:
        self.rule = rule
        self.quiet_seconds, self.max_open = quiet_seconds, max_open
        self.partial_quiet_seconds = max(quiet_seconds, partial_quiet_seconds or 0.0)
        self.open: dict[str, TrackedSeries] = {}

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        return bool(self.open)

    def restore(self, series: TrackedSeries) -> None:
        """Put back a series rebuilt from stored findings (after a restart, or a late slice reopening it)."""
        self.open[series.uid] = series

    def verdict(self, uid: str, final: bool) -> SeriesVerdict:
        s = self.open[uid]
        return decide(s.findings, self.rule, final=final)

    # -- events ------------------------------------------------------------------------------------------------
    def add(self, arrivals: Iterable[Arrival], now: float) -> list[Update]:
        """Add a batch of analysed slices, then re-apply the rule to each series it touched."""
        touched: list[str] = []
        for a in arrivals:
            s = self.open.get(a.series_uid)
            if s is None:
                t0 = a.arrived if a.arrived is not None else now
                s = self.open[a.series_uid] = TrackedSeries(a.series_uid, a.study_uid, t0, t0, a.description)
            if s.add(a.order, a.finding, a.ident):
                s.last_seen = max(s.last_seen, a.arrived if a.arrived is not None else now)
                if a.expected:
                    s.expected = a.expected
                if a.series_uid not in touched:
                    touched.append(a.series_uid)
        updates: list[Update] = []
        for uid in touched:
            s = self.open[uid]
            if s.expected and s.count >= s.expected:
                updates.append(self.complete(uid, f"expected count: {s.count} of {s.expected} slices received"))
                continue
            u = self.evaluate(uid)
            if u is not None:
                updates.append(u)
        while len(self.open) > self.max_open:
            idle = [s for s in self.open.values() if s.uid not in touched] or list(self.open.values())
            oldest = min(idle, key=lambda s: s.last_seen)
            updates.append(self.complete(oldest.uid, f"more than {self.max_open} series in flight"))
        return updates

    def evaluate(self, uid: str) -> Update | None:
        """Provisional update when the provisional result turns positive, or stops being positive."""
        s = self.open[uid]
        v = self.verdict(uid, final=False)
        if v.result == "positive" and s.announced != "positive":
            s.announced = "positive"
            return Update(uid, "provisional", v)
        if s.announced == "positive" and v.result != "positive":
            s.announced = v.result
            return Update(uid, "provisional", v)
        return None

    def hint(self, uid: str, reason: str, *, weak: bool = False) -> bool:
        """A completion signal for an open series (applied at the next tick); False when it is not open.

        weak: a signal that can come before the series is whole — a DICOM association released (some senders
        open one association per image, or split a series): it completes the series only when lung was seen and
        the slices so far do not look like part of a series; otherwise the quiet time decides. An end marker is
        not weak."""
        s = self.open.get(uid)
        if s is None:
            return False
        s.hint, s.hint_weak = reason, weak
        return True

    def _partial(self, s: TrackedSeries) -> str | None:
        return partial_reason(list(s.findings)) if self.partial_quiet_seconds > self.quiet_seconds else None

    def _looks_whole(self, s: TrackedSeries) -> bool:
        """Lung seen, and it has ended at both end slices, with no slice missing (always, where the check is off):
        the slices above the apices alone, sent one association each, are no whole series, nor are those down to
        the lung's last few slices."""
        if self.partial_quiet_seconds <= self.quiet_seconds:
            return True
        findings = list(s.findings)
        return (bool(lung_areas(findings).max(initial=0.0) > 0)
                and partial_reason(findings, end_share=ENDED_LUNG_SHARE) is None)

    def tick(self, now: float, idle_since: float | None = None) -> list[Update]:
        """Finals for series that are complete now: a pending hint, or quiet for `quiet_seconds` (for
        `partial_quiet_seconds` while the slices look like part of a series; the reason says why).

        idle_since: when the input queue last became empty (None: it is not empty). Slices still waiting in the
        queue may belong to any series, so a series completes only while nothing waits. The quiet time counts
        from the last slice's *arrival*: an appliance catching up on a backlog does not delay the final verdict by
        the time it took to catch up.
        """
        out = []
        for uid in list(self.open):
            s = self.open[uid]
            if s.hint and s.hint_weak and not self._looks_whole(s):
                s.hint = None  # the sender let go of part of the series: wait for the rest (or the quiet time)
            if s.hint:
                out.append(self.complete(uid, s.hint))
            elif idle_since is not None and now - s.last_seen >= self.quiet_seconds:
                if s.partial is None:  # judged once per quiet stretch (a new slice clears it)
                    s.partial = self._partial(s) or ""
                if not s.partial:
                    out.append(self.complete(uid, f"quiet: no new slice for {self.quiet_seconds:g} s"))
                elif now - s.last_seen >= self.partial_quiet_seconds:
                    out.append(self.complete(uid, f"quiet: no new slice for {self.partial_quiet_seconds:g} s, "
                                                  f"though the series looks incomplete ({s.partial})"))
        return out

    def waiting(self) -> dict[str, str]:
        """Series quiet for `quiet_seconds` but held open at the last tick because they look incomplete: uid -> why.
        Reads what `tick` found (no new work: the status thread calls it too)."""
        return {uid: s.partial for uid, s in list(self.open.items()) if s.partial and not s.hint}

    def complete(self, uid: str, reason: str) -> Update:
        v = self.verdict(uid, final=True)
        del self.open[uid]
        return Update(uid, "final", v, reason)
