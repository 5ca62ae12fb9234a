"""Series tracker: order by position whatever the arrival order, provisional on the sorted set, completeness."""
from __future__ import annotations

import random

import pytest

from appliance.domain import Box, Rect, SliceFinding
from appliance.pipeline.case_logic import CaseRule, SeriesSummary, study_verdict
from appliance.pipeline.tracker import Arrival, SeriesTracker


def finding(k: int, quadrant: str | None = None, lung: bool = True) -> SliceFinding:
    boxes = [Box(Rect(100, 100, 140, 140), 120.0, 0.9, quadrant)] if quadrant else []  # type: ignore[arg-type]
    return SliceFinding(f"s{k}", -float(k), (512, 512), Rect(50, 50, 450, 450) if lung else None, boxes)


def arrival(k: int, quadrant: str | None = None, series: str = "1.2.3", study: str = "9.8", expected=None,
            ident: str | None = None) -> Arrival:
    f = finding(k, quadrant)
    return Arrival(series, study, (float(k), 0, f"s{k}"), f, ident or f"sop-{series}-{k}", expected)


def tracker(quiet_seconds: float = 5.0, max_open: int = 16, **rule) -> SeriesTracker:
    return SeriesTracker(CaseRule.chen2020(min_slices=20).but(**rule), quiet_seconds=quiet_seconds,
                         max_open=max_open)


LESION = {10: "upper-left", 11: "upper-left", 12: "upper-left"}


def test_provisional_fires_once_on_sorted_set_whatever_the_arrival_order():
    order = list(range(30))
    random.Random(3).shuffle(order)
    t = tracker()
    fired_after = []
    for i in range(0, 30, 4):
        batch = [arrival(k, LESION.get(k)) for k in order[i:i + 4]]
        for u in t.add(batch, now=float(i)):
            assert u.kind == "provisional" and u.verdict.result == "positive"
            fired_after.append(set(order[:i + 4]))
    assert len(fired_after) == 1, "one provisional positive, not one per batch"
    assert {10, 11, 12} <= fired_after[0]
    # before that batch, the run was not complete
    first = fired_after[0]
    prev = set(order[:len(first) - 4])
    assert not {10, 11, 12} <= prev
    s = t.open["1.2.3"]
    assert [f.position for f in s.findings] == sorted((f.position for f in s.findings), reverse=True)
    final = t.complete("1.2.3", "test")
    assert final.verdict.result == "positive" and final.verdict.state == "final"
    ev = final.verdict.evidence
    assert (ev.quadrant, ev.first_slice, ev.last_slice, ev.run) == ("upper-left", 10, 12, 3)


def test_provisional_is_withdrawn_when_a_late_slice_breaks_the_run():
    t = tracker(min_slices=1)
    # every other slice arrives first: 10, 12, 14 look consecutive (spacing 2) and all show lesion
    ups = t.add([arrival(k, "lower-right") for k in (10, 12, 14)], now=0.0)
    assert [(u.kind, u.verdict.result) for u in ups] == [("provisional", "positive")]
    # the slices in between arrive without lesion: no run of 3 any more
    ups = t.add([arrival(k) for k in (11, 13)], now=1.0)
    assert len(ups) == 1 and ups[0].kind == "provisional" and ups[0].verdict.result != "positive"
    assert t.complete("1.2.3", "x").verdict.result == "negative"


def test_duplicates_are_ignored():
    t = tracker()
    t.add([arrival(1), arrival(2)], now=0.0)
    t.add([arrival(1), arrival(2, ident="sop-1.2.3-2")], now=1.0)
    assert t.open["1.2.3"].count == 2


def test_expected_count_completes_the_series():
    t = tracker(min_slices=3)
    assert t.add([arrival(k, expected=4) for k in range(3)], now=0.0) == []
    ups = t.add([arrival(3, expected=4)], now=1.0)
    assert len(ups) == 1 and ups[0].kind == "final"
    assert ups[0].complete_reason.startswith("expected count: 4 of 4")
    assert ups[0].verdict.result == "negative"
    assert not t.in_flight


def test_quiet_time_counts_only_while_the_queue_is_empty():
    t = tracker(quiet_seconds=5.0)
    t.add([arrival(k) for k in range(3)], now=100.0)
    assert t.tick(now=103.0, idle_since=100.0) == []
    assert t.tick(now=120.0, idle_since=None) == [], "files still waiting (maybe of this series): not complete"
    # the queue emptied at 118 and none of its files belonged to this series (they would have moved its last
    # arrival): quiet since 100, so complete as soon as nothing waits
    ups = t.tick(now=120.0, idle_since=118.0)
    assert len(ups) == 1 and ups[0].kind == "final"
    assert ups[0].complete_reason == "quiet: no new slice for 5 s"
    # fewer than min_slices: cannot be negative
    assert ups[0].verdict.result == "indeterminate"
    assert "fewer than the 20" in ups[0].verdict.reason


def test_hint_completes_at_next_tick_and_unknown_series_is_refused():
    t = tracker()
    t.add([arrival(k) for k in range(3)], now=0.0)
    assert t.hint("no-such-series", "end marker") is False
    assert t.hint("1.2.3", "end marker: DICOMDIR received") is True
    ups = t.tick(now=0.1, idle_since=None)
    assert [(u.kind, u.complete_reason) for u in ups] == [("final", "end marker: DICOMDIR received")]


def test_too_many_series_in_flight_completes_the_quietest():
    t = tracker(max_open=2)
    t.add([arrival(0, series="a")], now=0.0)
    t.add([arrival(0, series="b")], now=1.0)
    ups = t.add([arrival(0, series="c")], now=2.0)
    assert [(u.series_uid, u.kind) for u in ups] == [("a", "final")]
    assert "more than 2 series" in ups[0].complete_reason
    assert set(t.open) == {"b", "c"}


def test_restore_rebuilds_a_series_and_keeps_its_announcement():
    t = tracker(min_slices=1)
    t.add([arrival(k, "upper-right") for k in range(3)], now=0.0)
    s = t.open.pop("1.2.3")
    t2 = tracker(min_slices=1)
    t2.restore(s)
    assert t2.evaluate("1.2.3") is None, "already announced: no second provisional"
    ups = t2.add([arrival(3, "upper-right")], now=1.0)
    assert ups == []


def _summary(key: str, result: str, state: str, run: int = 0, updated: float = 0.0) -> SeriesSummary:
    from appliance.domain import Evidence, SeriesVerdict

    ev = Evidence("upper-left", 0, run - 1, run) if run else None  # type: ignore[arg-type]
    return SeriesSummary(key, SeriesVerdict(result, state, ev, 30, 25, run), "desc", updated)  # type: ignore[arg-type]


def test_study_verdict_positive_when_any_series_is_final_when_all_are():
    v, lead = study_verdict([_summary("a", "negative", "final", updated=1), _summary("b", "positive", "final", 4, 0),
                             _summary("c", "positive", "provisional", 3, 5)])
    assert v.result == "positive" and v.state == "provisional"
    assert lead.series_key == "b", "the positive series with the longest run leads"
    v, lead = study_verdict([_summary("a", "negative", "final", updated=1), _summary("b", "indeterminate", "final",
                                                                                    updated=2)])
    assert (v.result, v.state, lead.series_key) == ("negative", "final", "a")
    with pytest.raises(ValueError):
        study_verdict([])


def test_quiet_time_counts_from_arrival_not_from_a_backlog():
    """Slices that arrived at t=0..0.3 but were analysed at t=10 (a backlog): with 5 s of quiet the series is
    complete as soon as the queue is empty, not 5 s after the backlog cleared."""
    t = tracker(min_slices=1)
    arrivals = [Arrival("S", "T", (float(k), 0, f"s{k}"), finding(k), f"sop-{k}", arrived=k * 0.01) for k in range(30)]
    t.add(arrivals, now=10.0)
    assert [u.kind for u in t.tick(10.0, idle_since=10.0)] == ["final"]
    t2 = tracker(min_slices=1)
    t2.add([Arrival("S", "T", (0.0, 0, "s0"), finding(0), "sop-0", arrived=9.0)], now=10.0)
    assert t2.tick(10.0, idle_since=10.0) == []  # arrived 1 s ago: not quiet yet
    assert t2.tick(14.5, idle_since=None) == []  # something still waits in the queue
    assert [u.kind for u in t2.tick(14.1, idle_since=10.0)] == ["final"]


def test_min_foci_holds_a_single_focus_back_until_a_second_one_arrives():
    """With min_foci=2 a run on one lesion focus is no positive; a second, separate focus on later slices makes one
    (streaming: provisional as soon as it is there), and a series that never gets one ends negative, naming it."""
    def far(k: int) -> Arrival:  # a box in the lower-right, far from finding()'s upper-left box
        f = SliceFinding(f"s{k}", -float(k), (512, 512), Rect(50, 50, 450, 450),
                         [Box(Rect(350, 350, 390, 390), 120.0, 0.9, "lower-right")])
        return Arrival("1.2.3", "9.8", (float(k), 0, f"s{k}"), f, f"sop-1.2.3-{k}", None)

    t = tracker(min_foci=2)
    ups = t.add([arrival(k, LESION.get(k)) for k in range(20)], now=0.0)
    assert ups == [] or all(u.verdict.result != "positive" for u in ups)
    v = t.verdict("1.2.3", final=False)
    assert v.result == "negative" and v.focal is not None and v.focal.run == 3 and v.foci == 1
    ups = t.add([far(k) for k in (20, 21, 22)] + [arrival(k) for k in range(23, 30)], now=1.0)
    assert [(u.kind, u.verdict.result, u.verdict.foci) for u in ups] == [("provisional", "positive", 2)]
    one = tracker(min_foci=2)
    one.add([arrival(k, LESION.get(k)) for k in range(30)], now=0.0)
    final = one.complete("1.2.3", "test").verdict
    assert final.result == "negative" and final.state == "final" and final.evidence is None
    assert final.focal.quadrant == "upper-left" and "single focal lesion" in final.reason


def chest_arrival(k: int, n: int = 40, quadrant: str | None = None) -> Arrival:
    """Slice k of an n-slice chest series: no lung on the 4 slices at either end."""
    f = finding(k, quadrant, lung=4 <= k < n - 4)
    return Arrival("S", "T", (float(k), 0, f"s{k}"), f, f"sop-{k}")


def test_a_paused_export_is_not_made_final_on_its_first_part():
    t = SeriesTracker(CaseRule.chen2020(min_slices=1), quiet_seconds=5.0, max_open=16, partial_quiet_seconds=60.0)
    lesion = {k: "lower-left" for k in range(26, 32)}  # the run lies in the part still to come
    t.add([chest_arrival(k, quadrant=lesion.get(k)) for k in range(20)], now=0.0)
    assert t.tick(now=30.0, idle_since=1.0) == [], "the lung goes on below slice 19: wait, do not go final"
    assert t.waiting() == {"S": "the lung goes on below the last slice received"}
    ups = t.add([chest_arrival(k, quadrant=lesion.get(k)) for k in range(20, 40)], now=31.0)
    assert [(u.kind, u.verdict.result) for u in ups] == [("provisional", "positive")]
    assert t.tick(now=35.0, idle_since=32.0) == [] and t.waiting() == {}
    ups = t.tick(now=36.5, idle_since=32.0)
    assert [(u.kind, u.verdict.result, u.complete_reason) for u in ups] == [
        ("final", "positive", "quiet: no new slice for 5 s")]


def test_a_series_that_stays_incomplete_goes_final_after_the_longer_quiet_with_the_reason():
    t = SeriesTracker(CaseRule.chen2020(min_slices=1), quiet_seconds=5.0, max_open=16, partial_quiet_seconds=60.0)
    t.add([chest_arrival(k) for k in range(20) if k not in (10, 11)], now=0.0)
    assert t.tick(now=59.0, idle_since=1.0) == []
    ups = t.tick(now=60.0, idle_since=1.0)
    assert len(ups) == 1 and ups[0].kind == "final" and ups[0].verdict.result == "negative"
    assert ups[0].complete_reason == ("quiet: no new slice for 60 s, though the series looks incomplete "
                                      "(2 slices missing between z -12 and -9 mm)")
    assert t.waiting() == {}


def test_a_whole_series_goes_final_after_the_plain_quiet_time():
    t = SeriesTracker(CaseRule.chen2020(min_slices=1), quiet_seconds=5.0, max_open=16, partial_quiet_seconds=60.0)
    t.add([chest_arrival(k) for k in range(40)], now=0.0)
    ups = t.tick(now=5.0, idle_since=1.0)
    assert [(u.kind, u.complete_reason) for u in ups] == [("final", "quiet: no new slice for 5 s")]
    off = SeriesTracker(CaseRule.chen2020(min_slices=1), quiet_seconds=5.0, max_open=16, partial_quiet_seconds=2.0)
    off.add([chest_arrival(k) for k in range(20)], now=0.0)
    assert [u.kind for u in off.tick(now=5.0, idle_since=1.0)] == ["final"], "not longer than quiet: off"


def test_an_association_released_after_part_of_a_series_does_not_complete_it():
    """A sender that releases its association after every image (or splits a series): the release is a weak
    signal, so the series completes when its slices look whole, not at the first release."""
    t = SeriesTracker(CaseRule.chen2020(min_slices=1), quiet_seconds=5.0, max_open=16, partial_quiet_seconds=60.0)
    done = None
    for k in range(40):
        t.add([chest_arrival(k)], now=float(k))
        assert t.hint("S", "sender: association released", weak=True)
        ups = t.tick(now=k + 0.1, idle_since=k + 0.05)
        if ups:
            done = k, ups
            break
    # not above the apices (no lung yet), not while the lung goes on: on the first slice below the lung (36)
    assert done is not None and done[0] == 36
    assert [(u.kind, u.complete_reason) for u in done[1]] == [("final", "sender: association released")]


def test_an_end_marker_completes_even_a_partial_looking_series():
    t = SeriesTracker(CaseRule.chen2020(min_slices=1), quiet_seconds=5.0, max_open=16, partial_quiet_seconds=60.0)
    t.add([chest_arrival(k) for k in range(20)], now=0.0)
    t.hint("S", "end marker: end.txt received")
    assert [u.complete_reason for u in t.tick(now=0.1)] == ["end marker: end.txt received"]
    t.add([chest_arrival(k) for k in range(20)], now=0.0)
    t.hint("S", "sender: association released", weak=True)
    assert t.tick(now=0.1) == [] and "S" in t.open, "weak, and the lung goes on: the quiet time decides"
    assert [u.kind for u in t.tick(now=61.0, idle_since=1.0)] == ["final"]


def _graded(key: str, result: str, run: int, position: str, reasons: list[str], lung: int = 25,
            focal: bool = False) -> SeriesSummary:
    from appliance.domain import Evidence, SeriesVerdict

    ev = Evidence("lower-left", 0, run - 1, run) if run else None  # type: ignore[arg-type]
    v = SeriesVerdict(result, "final", ev, 30, lung, run, grade={"category": "typical", "reasons": reasons},  # type: ignore[arg-type]
                      focal=Evidence("lower-left", 2, 5, 4) if focal else None, patient_position=position)
    return SeriesSummary(key, v, "desc", 0.0)


def test_a_supine_positive_advising_prone_images_says_what_the_prone_series_shows():
    from appliance.pipeline.case_logic import PRONE_CLEAR, PRONE_PERSISTS
    from appliance.pipeline.grading import DEPENDENT_ADVICE

    advice = f"posterior 84 % ({DEPENDENT_ADVICE})"
    supine = _graded("s", "positive", 6, "HFS", ["bilateral", advice])
    clear = _graded("p", "indeterminate", 0, "HFP", [])  # a short, limited prone series with no lesion run
    v, lead = study_verdict([supine, clear])
    assert v.result == "positive" and lead.series_key == "s", "information, never a change of result"
    assert v.grade["reasons"] == ["bilateral", advice, PRONE_CLEAR]
    assert supine.verdict.grade["reasons"] == ["bilateral", advice], "the series' own verdict is left alone"
    assert v.patient_position == "HFS"
    for persists in (_graded("p", "positive", 5, "FFP", ["bilateral"]),
                     _graded("p", "negative", 0, "HFP", [], focal=True)):  # one focal lesion is a run too
        v, _ = study_verdict([supine, persists])
        assert v.grade["reasons"][-1] == PRONE_PERSISTS
    # the prone series may lead (a longer run): the note is the study's, whichever series leads
    v, lead = study_verdict([supine, _graded("p", "positive", 9, "HFP", ["bilateral"])])
    assert lead.series_key == "p" and v.grade["reasons"] == ["bilateral", PRONE_PERSISTS]
    # no note: no advice, no prone series, or a prone series that saw no lung
    plain = _graded("s", "positive", 6, "HFS", ["bilateral", "peripheral 80 %"])
    for series in ([plain, clear], [supine, _graded("p", "negative", 0, "HFS", [])],
                   [supine, _graded("p", "indeterminate", 0, "HFP", [], lung=0)], [supine]):
        v, _ = study_verdict(series)
        assert not any(r.startswith("prone images") for r in v.grade["reasons"]), series


def _acq(s: SeriesSummary, noise: float | None, noisy: bool) -> SeriesSummary:
    s.verdict.acquisition = {"noise": noise, "noisy": noisy, "limit": 0.016, "smoothed_slices": 0,
                             "slices_measured": 30, "flat_boxes": 0}
    return s


def test_a_positive_only_on_a_noisy_series_beside_a_smoother_negative_one_says_so_first():
    """A site exports a scan twice: a thin lung-kernel series (noisy) and a smoother one. When only the noisy one is
    positive, the study stays positive (a thin series may show what a smooth one blurs away) and the grade's
    first reason says the boxes may be noise."""
    from appliance.pipeline.case_logic import NOISY_ONLY, noise_note

    lung_kernel = _acq(_graded("n", "positive", 6, "HFS", ["bilateral"]), 0.034, True)
    soft = _acq(_graded("q", "negative", 0, "HFS", []), 0.009, False)
    v, lead = study_verdict([lung_kernel, soft])
    assert v.result == "positive" and lead.series_key == "n", "information, never a change of result"
    first = v.grade["reasons"][0]
    assert first.startswith(NOISY_ONLY) and "noise 0.009" in first and "read with care" in first
    assert v.grade["reasons"][1:] == ["bilateral"] and lung_kernel.verdict.grade["reasons"] == ["bilateral"]
    # no note: the smoother series is positive too, or is not negative, or is prone, or is noisy itself; or the
    # positive series is not noisy; or there is no other series
    both = _acq(_graded("q", "positive", 5, "HFS", ["bilateral"]), 0.009, False)
    for series in ([lung_kernel, both], [lung_kernel, _acq(_graded("q", "indeterminate", 0, "HFS", []), 0.009, False)],
                   [lung_kernel, _acq(_graded("q", "negative", 0, "HFP", []), 0.009, False)],
                   [lung_kernel, _acq(_graded("q", "negative", 0, "HFS", []), 0.020, True)],
                   [_acq(_graded("n", "positive", 6, "HFS", ["bilateral"]), 0.012, False), soft], [lung_kernel],
                   [lung_kernel, _acq(_graded("q", "negative", 0, "HFS", []), None, False)]):  # no figure: no reference
        assert noise_note(series) is None, series
        v, _ = study_verdict(series)
        assert not any(r.startswith(NOISY_ONLY) for r in v.grade["reasons"]), series
