import dataclasses

import pytest

from appliance.domain import Box, Rect, SliceFinding
from appliance.pipeline.anatomy import zone_of
from appliance.pipeline.case_logic import CaseRule, decide, find_evidence, foci, longest_runs, quadrant_of


def rule(**changes) -> CaseRule:
    """Chen et al. 2020's rule (3 slices, one quadrant), with the given settings changed."""
    return CaseRule.chen2020().but(**changes)


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
    assert decide(two, rule(min_slices=20)).result == "negative"
    three = series([(), (UL,), (UL,), (UL,), ()] + [()] * 20)
    ev = find_evidence(three)
    assert ev is not None and (ev.quadrant, ev.first_slice, ev.last_slice, ev.run) == (UL, 1, 3, 3)
    assert decide(three, rule()).result == "positive"


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
    v = decide(fs, rule(min_slices=1))
    assert v.result == "negative" and v.lung_slices == 3 and v.lesion_slices == 3


def test_indeterminate_reasons():
    short = series([()] * 5)
    v = decide(short, rule(min_slices=20))
    assert v.result == "indeterminate" and "5 slice" in v.reason
    nolung = [finding(-i, (), lung=False) for i in range(25)]
    v = decide(nolung, rule(min_slices=20))
    assert v.result == "indeterminate" and "no lung" in v.reason
    # a positive run wins even in a short series
    assert decide(series([(UL,)] * 3), rule(min_slices=20)).result == "positive"


def test_provisional_state():
    assert decide(series([(UL,)] * 3), rule(), final=False).state == "provisional"


def test_min_run_mm_scales_the_rule_with_slice_thickness():
    thin = series([(UL,)] * 4 + [()] * 20, spacing=0.625)  # 4 slices of 0.625 mm = 2.5 mm
    assert find_evidence(thin, min_run_mm=5.0) is None
    assert find_evidence(thin) is not None  # the plain 3-slice rule fires
    thin8 = series([(UL,)] * 8 + [()] * 20, spacing=0.625)  # 8 × 0.625 = 5 mm
    assert find_evidence(thin8, min_run_mm=5.0).run == 8
    thick = series([(UL,)] * 3 + [()] * 20, spacing=5.0)  # 3 slices of 5 mm = 15 mm: the plain rule
    assert find_evidence(thick, min_run_mm=5.0).run == 3
    assert decide(thin, rule(min_run_mm=5.0, min_slices=1)).result == "negative"


# -- foci: one lesion followed from slice to slice ------------------------------------------------------------------
def boxed(pos: float, *rects: tuple[int, int, int, int]) -> SliceFinding:
    """A slice with a box per (y0, x0, y1, x1); quadrant from the box centre in a 512² lung box."""
    boxes = [Box(Rect(*r), 100.0, 0.95, quadrant_of((r[0] + r[2]) / 2, (r[1] + r[3]) / 2, 256, 256)) for r in rects]
    return SliceFinding(f"s{pos}", pos, (512, 512), Rect(0, 0, 512, 512), boxes)


TUMOUR = (300, 330, 360, 400)  # lower-right
PATCH = (100, 80, 150, 140)  # upper-left, far from it


def test_foci_follow_overlapping_boxes_and_split_distant_ones():
    fs = [boxed(-i, TUMOUR, PATCH) if 2 <= i <= 5 else boxed(-i, TUMOUR) if i < 9 else boxed(-i) for i in range(12)]
    assert foci(fs) == [(0, 8), (2, 5)]  # longest first
    # a box that drifts a few pixels per slice stays one focus; one that jumps across the lung does not
    drift = [boxed(-i, (300 + 4 * i, 330, 340 + 4 * i, 370)) for i in range(6)]
    assert foci(drift) == [(0, 5)]
    jump = [boxed(-i, TUMOUR if i % 3 else PATCH) for i in range(7)]  # P T T P T T P
    assert sorted(foci(jump)) == [(0, 0), (1, 5), (3, 3), (6, 6)]  # T bridges one slice; P, three apart, does not
    assert sorted(foci(jump, skip=0)) == [(0, 0), (1, 2), (3, 3), (4, 5), (6, 6)]


def test_a_focus_bridges_one_slice_where_the_model_missed_it():
    """A tumour marked on slices 0-2 and 4-6 (the model missed slice 3) is one focus, not two; a two-slice miss
    splits it. The slices are present: a *missing* slice (a gap in positions) always splits."""
    one_miss = [boxed(-i) if i == 3 else boxed(-i, TUMOUR) for i in range(7)] + [boxed(-i) for i in range(7, 30)]
    assert foci(one_miss) == [(0, 6)]
    two_miss = [boxed(-i) if i in (3, 4) else boxed(-i, TUMOUR) for i in range(8)] + [boxed(-i) for i in range(8, 30)]
    assert sorted(foci(two_miss)) == [(0, 2), (5, 7)]
    v = decide(one_miss, rule(min_slices=20, min_foci=2))
    assert v.result == "negative" and v.foci == 1  # Chen et al.'s rule sees two runs of 3; it is one lesion
    assert decide(two_miss, rule(min_slices=20, min_foci=2)).result == "positive"


def test_boxes_just_apart_join_only_within_the_growth_margin():
    a, b = (100, 100, 120, 120), (100, 125, 120, 145)  # 5 px apart; 2 % of 512 = 10.24 px
    assert foci([boxed(0, a), boxed(-1, b)]) == [(0, 1)]
    assert sorted(foci([boxed(0, a), boxed(-1, b)], grow=0.0)) == [(0, 0), (1, 1)]


def test_a_missing_slice_splits_a_focus():
    fs = [boxed(p, TUMOUR) for p in (0.0, -1.0, -2.0, -4.0, -5.0, -6.0)] + [boxed(-p) for p in range(7, 30)]
    assert sorted(foci(fs)) == [(0, 2), (3, 5)]


def test_single_focus_is_negative_with_the_focus_named():
    """A tumour: one focus on 8 consecutive slices in one quadrant. Chen et al.'s rule (min_foci=1) fires; the
    multifocal rule gives a negative that names the focus for a radiologist."""
    fs = [boxed(-i) for i in range(10)] + [boxed(-i, TUMOUR) for i in range(10, 18)] + [boxed(-i) for i in range(18, 40)]
    seed = decide(fs, rule(min_slices=20))
    assert seed.result == "positive" and seed.evidence.run == 8 and seed.foci == 1
    v = decide(fs, rule(min_slices=20, min_foci=2))
    assert v.result == "negative" and v.evidence is None and v.foci == 1
    assert (v.focal.quadrant, v.focal.first_slice, v.focal.last_slice, v.focal.run) == (LR, 10, 17, 8)
    assert ("single focal lesion, patient's left middle zone, posterior (image lower-right, slices 11–18): not the"
            " multifocal pattern") in v.reason
    assert "mm across" not in v.reason  # crop images: no pixel size, no size
    on_dicom = decide([dataclasses.replace(f, pixel_mm=0.7) for f in fs], rule(min_slices=20, min_foci=2))
    assert "single focal lesion, about 49 mm across and 8 mm long, patient's left middle zone" in on_dicom.reason


def test_a_focus_that_wraps_a_mass_core_is_a_mass_not_a_focus_and_is_named():
    """A tumour broad-based on the chest wall: its halo wraps a soft-tissue core (appliance.pipeline.halo_core).
    That focus is the mass: it does not count (like a nodule's halo) and the verdict names it (reason, `others`,
    `focal`); a lung cancer beside one stray patch is then not the multifocal pattern."""
    from appliance.domain import Core, SliceMeasures

    focal = SliceMeasures(0.49, lung_right=20000, lung_left=20000, lesion_left=4000)  # 10 % of the lungs
    fs = [boxed(-i, TUMOUR) if 10 <= i < 18 else boxed(-i) for i in range(40)]
    fs = [dataclasses.replace(f, pixel_mm=0.7, measures=focal) for f in fs]
    inside = Core(Rect(320, 340, 350, 380), 450.0, 14.0, 30.0)  # centre inside the tumour's box
    fs[14] = dataclasses.replace(fs[14], cores=[inside])
    multifocal = rule(min_slices=20, min_foci=2, other_findings=True)
    v = decide(fs, multifocal)
    assert v.result == "negative" and v.foci == 0, "the mass' halo is not a lesion focus"
    assert (v.focal.quadrant, v.focal.first_slice, v.focal.last_slice) == (LR, 10, 17)
    assert v.reason.startswith("a solid mass, about 49 mm across and 8 mm long, patient's left middle zone, posterior")
    assert "a soft-tissue core about 14 mm thick under a ground-glass halo" in v.reason
    assert "single focal lesion" not in v.reason and v.reason.count("solid mass") == 1
    [mass] = v.others
    assert (mass["kind"], mass["first_slice"], mass["last_slice"], mass["quadrant"]) == ("mass", 10, 17, LR)
    assert mass["diameter_mm"] == pytest.approx(49.0) and mass["mean_hu"] == 30
    assert mass["text"] == "solid mass 49 mm, patient's left middle zone — not a COVID-19 pattern"
    # not a mass: the seed's rule (no other-findings stage), a core too small or too thin, one outside the focus'
    # boxes, or a focus much longer along z than it is wide (a confluent consolidation, not a round mass)
    seed = decide(fs, multifocal.but(other_findings=False))
    assert seed.others == [] and seed.foci == 1 and "single focal lesion" in seed.reason
    long_focus = [dataclasses.replace(f, position=f.position * 10) for f in fs]  # 8 slices of 10 mm: 80 mm > 1.5 × 49
    for other in ([dataclasses.replace(f, cores=[dataclasses.replace(inside, area_mm2=250.0)]) if f.cores else f
                   for f in fs],
                  [dataclasses.replace(f, cores=[dataclasses.replace(inside, thick_mm=8.0)]) if f.cores else f
                   for f in fs],
                  [dataclasses.replace(f, cores=[dataclasses.replace(inside, rect=Rect(100, 80, 150, 140))])
                   if f.cores else f for f in fs],
                  long_focus):
        w = decide(other, multifocal)
        assert w.others == [] and w.foci == 1 and "single focal lesion" in w.reason
    # beside one other patch: two foci by the seed's count (positive), one focus and a mass with the mass named
    two = list(fs)
    for i in range(30, 34):
        two[i] = dataclasses.replace(boxed(-i, PATCH), pixel_mm=0.7, measures=focal)
    assert decide(two, multifocal.but(other_findings=False)).result == "positive"
    p = decide(two, multifocal)
    assert p.result == "negative" and p.foci == 1 and p.evidence is None
    assert (p.focal.quadrant, p.focal.first_slice) == (LR, 10), "the mass is the finding named first"
    assert p.reason.startswith("a solid mass, about 49 mm across") and "; a single focal lesion," in p.reason
    assert "image upper-left, slices 31–34" in p.reason
    assert [(o["kind"], o["first_slice"], o["last_slice"], o["quadrant"]) for o in p.others] == [("mass", 10, 17, LR)]
    # with two other patches the lesions are multifocal without the mass: positive, the mass still named
    three = list(two)
    for i in range(22, 26):
        three[i] = dataclasses.replace(boxed(-i, (100, 380, 150, 440)), pixel_mm=0.7, measures=focal)  # upper-right
    q = decide(three, multifocal)
    assert q.result == "positive" and q.foci == 2 and q.evidence.quadrant != LR and q.reason is None
    assert [(o["kind"], o["first_slice"]) for o in q.others] == [("mass", 10)]
    # a core under the other patch's slices, outside the tumour's boxes, names nothing
    two[14] = dataclasses.replace(two[14], cores=[])
    two[31] = dataclasses.replace(two[31], cores=[dataclasses.replace(inside, rect=Rect(300, 300, 330, 330))])
    assert decide(two, multifocal).result == "positive" and decide(two, multifocal).others == []


def test_zone_is_the_third_of_the_lung_s_height():
    lung = [float(-z) for z in range(0, 91, 3)]  # 0 (head) to -90 mm (feet)
    assert [zone_of(p, lung) for p in (0.0, -29.0, -31.0, -59.0, -61.0, -90.0)] == \
        ["upper", "upper", "middle", "middle", "lower", "lower"]
    assert zone_of(-10.0, [-10.0]) == "middle"  # one slice of lung: no height to divide


def test_the_focal_lesion_is_placed_in_the_patient_s_zone_and_side():
    """Upper third of the lung's z-extent, patient's right (image left), anterior (image upper)."""
    fs = [boxed(-i, PATCH) if 2 <= i < 8 else boxed(-i) for i in range(30)]
    v = decide(fs, rule(min_slices=20, min_foci=2))
    assert v.result == "negative" and v.focal.quadrant == UL
    assert "patient's right upper zone, anterior (image upper-left, slices 3–8)" in v.reason


def test_two_foci_make_a_positive_even_in_one_quadrant():
    """COVID-19 pneumonia: two separate patches, each on ≥ 3 slices — the same quadrant or not."""
    other = (180, 300, 220, 340)  # upper-right... kept apart from TUMOUR by > the margin
    fs = [boxed(-i, TUMOUR) if i < 6 else boxed(-i) for i in range(25)]
    fs[8:11] = [boxed(-i, (400, 420, 430, 470)) for i in range(8, 11)]  # lower-right again, 3 slices, apart
    v = decide(fs, rule(min_slices=20, min_foci=2))
    assert v.result == "positive" and v.foci == 2 and v.evidence.quadrant == LR and v.focal is None
    fs[8:11] = [boxed(-i, other) for i in range(8, 10)] + [boxed(-10)]  # a second focus of only 2 slices
    assert decide(fs, rule(min_slices=20, min_foci=2)).result == "negative"


def test_focus_length_follows_the_extent_in_mm():
    """On 1 mm slices a focus must span 5 slices (min_run_mm=5) to count, like a run."""
    def two_foci(length):
        return [boxed(-i, TUMOUR, PATCH) if i < length else boxed(-i) for i in range(30)]
    assert decide(two_foci(4), rule(min_slices=20, min_foci=2, min_run_mm=5.0)).result == "negative"
    assert decide(two_foci(4), rule(min_slices=20, min_foci=2, min_run_mm=5.0)).focal is None  # no run fired at all
    assert decide(two_foci(5), rule(min_slices=20, min_foci=2, min_run_mm=5.0)).foci == 2
    assert decide(two_foci(5), rule(min_slices=20, min_foci=2, min_run_mm=5.0)).result == "positive"


def test_a_short_series_with_one_focus_stays_indeterminate_and_names_it():
    fs = [boxed(-i, TUMOUR) for i in range(5)]
    v = decide(fs, rule(min_slices=20, min_foci=2), final=False)
    assert v.result == "indeterminate" and v.state == "provisional" and v.focal is not None
    assert v.reason.startswith("only 5 slice(s)") and "single focal lesion" in v.reason


def test_a_short_series_names_the_lesion_it_shows_even_without_a_run():
    """An excerpt around a nodule: boxes on its last two slices are no run, but the reader learns they are there."""
    fs = [dataclasses.replace(f, pixel_mm=0.7) for f in [boxed(-i) for i in range(10)] + [boxed(-i, TUMOUR)
                                                                                           for i in (10, 11)]]
    v = decide(fs, rule(min_slices=20, min_foci=2))
    assert v.result == "indeterminate" and v.focal is None and v.evidence is None
    assert v.reason == ("only 12 slice(s), fewer than the 20 needed for a negative; lesion seen on slices 11–12, "
                        "about 49 mm across (patient's left, posterior, image lower-right): too few slices "
                        "here to call a pattern — a nodule or a patch that may continue beyond this series, for a "
                        "radiologist")
    # one boxed slice is not followed through the series: nothing named; nor on a series long enough for a negative
    one = fs[:11] + [boxed(-11)]
    assert decide(one, rule(min_slices=20, min_foci=2)).reason == (
        "only 12 slice(s), fewer than the 20 needed for a negative")
    assert decide(fs, rule(min_slices=10, min_foci=2)).reason is None


def test_case_rule_is_built_once_from_the_config_and_the_seed_rule_stays_available():
    import dataclasses

    from appliance.config import AnalysisConfig

    r = CaseRule.from_config(AnalysisConfig())
    assert (r.min_run, r.min_run_mm, r.min_foci, r.min_slices, r.gap_factor) == (3, 5.0, 2, 20, 1.5)
    assert r.min_peak == 0.8 and r.other_findings and CaseRule.chen2020().min_peak == 0.0
    assert r.for_images() == r.but(min_run_mm=0.0) and r.min_run_mm == 5.0, "a copy; the rule itself is unchanged"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.min_foci = 1  # type: ignore[misc]
    seed = CaseRule.chen2020()
    assert (seed.min_run, seed.min_run_mm, seed.min_foci) == (3, 0.0, 1)
    assert "at least 2 separate lesion foci" in r.describe() and "foci" not in seed.describe()
    # one focus on 3 slices: Chen et al.'s rule calls it positive, the appliance's rule a negative naming the focus
    fs = series([(UL,)] * 3 + [()] * 20, spacing=5.0)
    assert decide(fs, seed).result == "positive"
    v = decide(fs, r)
    assert v.result == "negative" and v.focal is not None and v.focal.quadrant == UL


def test_foci_that_are_all_faint_make_no_positive():
    """Strays on vessels or noise: two foci whose boxes the lesion model scores 0.55-0.65. With `min_peak` a positive
    needs one focus the model is sure of; one confident focus beside faint ones is enough."""
    def scored(pos: float, *rects_scores):
        f = boxed(pos, *(r for r, _ in rects_scores))
        return dataclasses.replace(f, boxes=[dataclasses.replace(b, score=s) for b, (_, s) in zip(f.boxes,
                                                                                                 rects_scores)])

    def study(patch_score: float):
        return [scored(-i, (TUMOUR, 0.65)) if 5 <= i < 9 else scored(-i, (PATCH, patch_score)) if 20 <= i < 24
                else boxed(-i) for i in range(40)]

    multifocal = rule(min_slices=20, min_foci=2)
    assert decide(study(0.55), multifocal).result == "positive", "without min_peak every focus counts as it is"
    v = decide(study(0.55), multifocal.but(min_peak=0.8))
    assert v.result == "negative" and v.evidence is None and v.focal is None and v.foci == 2
    assert v.reason == ("2 lesion foci, all faint (the most confident peaks at 0.65, below 0.8): not a confident "
                        "COVID-19 pattern — for a radiologist")
    p = decide(study(0.93), multifocal.but(min_peak=0.8))
    assert p.result == "positive" and p.evidence is not None and p.reason is None
    assert "one of them peaking at ≥ 0.8" in multifocal.but(min_peak=0.8).describe()


def test_a_focus_that_is_the_halo_of_a_solid_nodule_does_not_count_and_the_nodule_is_named():
    from appliance.domain import SliceMeasures, Solid

    def slice_(i: int) -> SliceFinding:
        boxes, solids = [], []
        if 8 <= i <= 13:  # the halo the lesion model marks around a solid nodule (upper-left)
            boxes.append(Box(Rect(140, 140, 190, 190), 300.0, 0.9, UL))
        if 9 <= i <= 12:  # the nodule's solid core, 20 mm at 0.7 mm pixels, lung all round it
            solids.append(Solid(Rect(150, 150, 179, 179), 280.0, 20.0, 20.0, False, 0.7, 0.1))
        if 14 <= i <= 18:  # a second lesion elsewhere: ground glass, no solid core (lower-right)
            boxes.append(Box(Rect(330, 330, 380, 380), 300.0, 0.9, LR))
        m = SliceMeasures(0.49, lung_right=20000, lung_left=20000, lesion_right=900 if boxes else 0,
                          lesion_left=300 if 14 <= i <= 18 else 0, ggo=1000 if boxes else 0, consolidation=100,
                          peripheral=800 if boxes else 0, central=200)
        return SliceFinding(f"s{i}", -5.0 * i, (512, 512), Rect(50, 50, 460, 460), boxes, solids=solids, measures=m)

    fs = [slice_(i) for i in range(30)]
    appliance = rule(min_slices=20, min_foci=2, min_run_mm=5.0, other_findings=True)
    assert decide(fs, appliance.but(other_findings=False)).result == "positive", "two foci: every focus counts"
    v = decide(fs, appliance)
    assert v.result == "negative" and v.foci == 1, "the halo does not count: one focus is left"
    (nodule,) = v.others
    assert nodule["kind"] == "nodule" and nodule["diameter_mm"] == 20.0 and (nodule["first_slice"],
                                                                           nodule["last_slice"]) == (9, 12)
    assert nodule["text"].startswith("solid nodule 20 mm, patient's right") and "not a COVID-19 pattern" in v.reason
    assert v.grade is not None and v.grade["category"] in ("indeterminate", "atypical")
    # without the nodule the same two foci are the multifocal pattern, graded
    plain = [dataclasses.replace(f, solids=[]) for f in fs]
    p = decide(plain, appliance)
    assert p.result == "positive" and p.others == [] and p.grade["category"] in ("typical", "indeterminate")
    assert 0 <= p.grade["severity"] <= 25 and set(p.grade["extent"]) == {"right", "left", "total"}


def test_the_verdict_carries_the_series_patient_position():
    fs = series([(), (UL,), (UL,), (UL,), ()] + [()] * 20)
    assert decide(fs, rule()).patient_position == ""  # images, or DICOM without the tag
    for k, f in enumerate(fs):
        f.patient_position = "HFS" if k == 3 else "HFP"
    assert decide(fs, rule()).patient_position == "HFP"  # most slices'


def test_a_positive_whose_boxes_were_mostly_left_out_as_texture_says_so():
    from appliance.domain import SliceMeasures
    from appliance.pipeline.case_logic import texture_note

    def slice_(i: int, flat: int) -> SliceFinding:
        boxes = []
        if 8 <= i <= 13:
            boxes.append(Box(Rect(140, 140, 190, 190), 300.0, 0.9, UL))
        if 16 <= i <= 20:
            boxes.append(Box(Rect(330, 330, 380, 380), 300.0, 0.9, LR))
        m = SliceMeasures(0.49, lung_right=20000, lung_left=20000, lesion_right=900 if boxes else 0, ggo=800,
                          peripheral=700, central=100)
        return SliceFinding(f"s{i}", -5.0 * i, (512, 512), Rect(50, 50, 460, 460), boxes, measures=m,
                            flat_boxes=flat)

    appliance = rule(min_slices=20, min_foci=2, min_run_mm=5.0)
    kept = 11  # boxes on slices 8-13 and 16-20
    for flat_per_slice, said in ((0, False), (1, True)):  # 0 or 30 boxes left out beside 11 kept
        v = decide([slice_(i, flat_per_slice) for i in range(30)], appliance)
        assert v.result == "positive" and v.grade is not None
        notes = [r for r in v.grade["reasons"] if r.startswith("mostly on normal lung (")]
        assert bool(notes) is said, v.grade["reasons"]
        assert v.acquisition is None  # no noise measured on these slices: no acquisition block either
    assert texture_note(30, kept) == ("mostly on normal lung (30 of 41 lesion boxes left out as no denser than the "
                                      "lung: emphysema or noise texture — read with care)")
    assert texture_note(kept, kept) is None  # as many left out as kept: not "mostly"
    negative = [dataclasses.replace(slice_(i, 5), boxes=[]) for i in range(30)]
    assert decide(negative, appliance).result == "negative"  # a negative has no grade to carry it
