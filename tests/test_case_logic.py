from appliance.domain import Box, Rect, SliceFinding
from appliance.pipeline.case_logic import decide, find_evidence, longest_runs, quadrant_of


def finding(pos: float, quads=(), lung=True) -> SliceFinding:
    boxes = [Box(Rect(0, 0, 10, 10), 50.0, 0.9, q) for q in quads]
    return SliceFinding(f"s{pos}", pos, (512, 512), Rect(0, 0, 512, 512) if lung else None, boxes)


def series(spec, spacing=1.0):
    """spec: list of quadrant tuples, head → feet; positions descend like a real series."""
    return [finding(-i * spacing, q) for i, q in enumerate(spec)]


UL, UR, LL, LR = "upper-left", "upper-right", "lower-left", "lower-right"


def test_quadrant_of_display_orientation():
    assert quadrant_of(10, 10, 50, 50) == UL
    assert quadrant_of(10, 90, 50, 50) == UR
    assert quadrant_of(90, 10, 50, 50) == LL
    assert quadrant_of(90, 90, 50, 50) == LR


def test_run_of_two_is_negative_and_three_is_positive():
    two = series([(), (UL,), (UL,), (), ()] + [()] * 20)
    assert find_evidence(two) is None
    assert decide(two, min_slices=20).result == "negative"
    three = series([(), (UL,), (UL,), (UL,), ()] + [()] * 20)
    ev = find_evidence(three)
    assert ev is not None and (ev.quadrant, ev.first_slice, ev.last_slice, ev.run) == (UL, 1, 3, 3)
    assert decide(three).result == "positive"


def test_alternating_quadrants_never_fire():
    alt = series([(UL,), (UR,), (UL,), (UR,), (UL,), (UR,)])
    assert find_evidence(alt) is None


def test_same_quadrant_with_other_boxes_still_counts():
    s = series([(UL, LR), (UL,), (UL, UR)])
    ev = find_evidence(s)
    assert ev is not None and ev.quadrant == UL and ev.run == 3


def test_missing_slice_breaks_run():
    # positions 0,1,2 then a missing 3, then 4,5: run of 3 only if contiguous
    fs = [finding(p, (LL,)) for p in (0.0, -1.0, -3.0, -4.0)] + [finding(-p, ()) for p in range(5, 30)]
    assert find_evidence(fs) is None
    fs2 = [finding(p, (LL,)) for p in (0.0, -1.0, -2.0)] + [finding(-p, ()) for p in range(3, 30)]
    assert find_evidence(fs2) is not None


def test_thick_and_thin_slices_use_their_own_spacing():
    thick = series([(LR,), (LR,), (LR,)] + [()] * 20, spacing=8.0)
    thin = series([(LR,), (LR,), (LR,)] + [()] * 20, spacing=0.625)
    assert find_evidence(thick).run == 3
    assert find_evidence(thin).run == 3


def test_longest_run_reported():
    s = series([(UR,), (UR,), (UR,), (), (UR,), (UR,), (UR,), (UR,), ()])
    runs = longest_runs(s)
    assert runs[UR] == (4, 4)
    assert find_evidence(s).first_slice == 4


def test_slices_without_lung_break_runs_and_count():
    fs = series([(UL,), (UL,)]) + [finding(-2.0, (), lung=False)] + [finding(-3.0, (UL,))]
    v = decide(fs, min_slices=1)
    assert v.result == "negative" and v.lung_slices == 3 and v.lesion_slices == 3


def test_indeterminate_reasons():
    short = series([()] * 5)
    v = decide(short, min_slices=20)
    assert v.result == "indeterminate" and "5 slice" in v.reason
    nolung = [finding(-i, (), lung=False) for i in range(25)]
    v = decide(nolung, min_slices=20)
    assert v.result == "indeterminate" and "no lung" in v.reason
    # a positive run wins even in a short series
    assert decide(series([(UL,)] * 3), min_slices=20).result == "positive"


def test_provisional_state():
    assert decide(series([(UL,)] * 3), final=False).state == "provisional"


def test_min_run_mm_scales_the_rule_with_slice_thickness():
    thin = series([(UL,)] * 4 + [()] * 20, spacing=0.625)  # 4 slices of 0.625 mm = 2.5 mm
    assert find_evidence(thin, min_run_mm=5.0) is None
    assert find_evidence(thin) is not None  # the plain 3-slice rule fires
    thin8 = series([(UL,)] * 8 + [()] * 20, spacing=0.625)  # 8 × 0.625 = 5 mm
    assert find_evidence(thin8, min_run_mm=5.0).run == 8
    thick = series([(UL,)] * 3 + [()] * 20, spacing=5.0)  # 3 slices of 5 mm = 15 mm: the plain rule
    assert find_evidence(thick, min_run_mm=5.0).run == 3
    assert decide(thin, min_run_mm=5.0, min_slices=1).result == "negative"
