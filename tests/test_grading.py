"""Per-slice measures and the study grade (appliance/pipeline/grading.py): synthetic phantoms, the analyzer's
wiring, real series."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from appliance.domain import SliceImage
from appliance.pipeline.grading import Grade, SliceMeasures, grade, measure_slice, region_score
from appliance.pipeline.solid import solid_components
from appliance.pipeline.solid_lesions import link_solids

from .test_solid import LEFT_LUNG, LUNG_BOX, PX, RIGHT_LUNG, XX, YY, chest, ellipse, real_series, solid_view

SPACING = 5.0
LUNGS = ellipse(*RIGHT_LUNG) | ellipse(*LEFT_LUNG)


def series(paint, n: int = 12) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """n slices of 5 mm; paint(k, hu) -> lesion mask (or None) adds the lesion of slice k."""
    hus, masks, positions = [], [], []
    for k in range(n):
        hu = chest(k)
        m = paint(k, hu)
        hus.append(hu)
        masks.append(m)
        positions.append(-SPACING * k)
    return hus, masks, positions


def measured(hus, masks) -> list[SliceMeasures]:
    return [measure_slice(hu, LUNGS, m, PX) for hu, m in zip(hus, masks)]


def ggo_patch(hu: np.ndarray, cy: float, cx: float, r: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    patch = ((YY - cy) ** 2 + (XX - cx) ** 2 <= r * r) & LUNGS
    hu[patch] = -600.0 + ndi.gaussian_filter(rng.normal(0, 1, hu.shape), 2)[patch] * 60.0
    return patch


def test_bilateral_peripheral_ground_glass_is_typical():
    def paint(k, hu):
        if not 2 <= k <= 9:
            return None
        return ggo_patch(hu, 385, 150, 30, k) | ggo_patch(hu, 375, 365, 26, k + 50)  # posterior, subpleural

    hus, masks, positions = series(paint)
    g = grade(measured(hus, masks), 2, positions)
    assert g.category == "typical", g
    assert g.reasons[0] == "bilateral" and g.reasons[1].startswith("peripheral")
    assert g.reasons[2].startswith("ground glass") and g.ground_glass_pct > 90
    assert "multifocal (2 foci)" in g.reasons
    assert g.extent["right"] > 0 and g.extent["left"] > 0 and 0 < g.extent["total"] < 25
    assert 2 <= g.severity <= 10 and g.regions["RLL"] >= 1 and g.regions["LLL"] >= 1


def test_a_mild_posterior_pattern_gets_the_prone_images_advice_and_keeps_its_category():
    def posterior(k, hu):  # small subpleural patches at the back of both lungs (display: bottom of the image)
        return None if not 2 <= k <= 9 else ggo_patch(hu, 390, 150, 20, k) | ggo_patch(hu, 390, 362, 20, k + 50)

    def anterior(k, hu):  # the same patches at the front
        return None if not 2 <= k <= 9 else ggo_patch(hu, 122, 150, 20, k) | ggo_patch(hu, 122, 362, 20, k + 50)

    def wide(k, hu):  # the whole posterior third of both lungs, every slice: not mild
        m = LUNGS & (YY > 300)
        hu[m] = -600.0
        return m

    back = grade(measured(*series(posterior)[:2]), 2, series(posterior)[2])
    front = grade(measured(*series(anterior)[:2]), 2, series(anterior)[2])
    assert back.posterior_pct > 90 and front.posterior_pct < 10
    assert back.extent["total"] < 5
    advice = [r for r in back.reasons if r.startswith("posterior")]
    assert advice == [f"posterior {back.posterior_pct:.0f} % (dependent density looks alike: prone images tell them "
                      "apart)"], back.reasons
    assert not any(r.startswith("posterior") for r in front.reasons)
    assert back.category == front.category  # advice, not a category change
    broad = grade(measured(*series(wide)[:2]), 2, series(wide)[2])
    assert broad.posterior_pct > 90 and broad.extent["total"] > 5
    assert not any(r.startswith("posterior") for r in broad.reasons)
    again = Grade.from_dict(back.to_dict())  # the store and the display read it back
    assert again.posterior_pct == back.posterior_pct and again.reasons == back.reasons
    m = measured(*series(posterior)[:2])[5]
    assert SliceMeasures.from_dict(m.to_dict()) == m and 0 < m.posterior <= m.lesion


def test_unilateral_central_nodular_consolidation_is_atypical_with_reasons():
    def paint(k, hu):
        if not 4 <= k <= 7:
            return None
        m = np.zeros(hu.shape, bool)
        for cy, cx in ((225, 215), (285, 220), (255, 195)):  # near the right hilum
            blob = (YY - cy) ** 2 + (XX - cx) ** 2 <= (6 / PX) ** 2
            hu[blob] = -20.0
            m |= blob
        return m

    hus, masks, positions = series(paint)
    g = grade(measured(hus, masks), 3, positions)
    assert g.category == "atypical", g
    assert g.reasons[0] == "unilateral (right)"
    assert g.reasons[1].startswith("central") and g.reasons[2].startswith("consolidation")
    assert "nodular" in g.reasons and g.extent["left"] == 0


def test_unilateral_posterior_crazy_paving_is_graded_not_a_mass():
    def paint(k, hu):
        if not 3 <= k <= 8:
            return None
        region = (YY > 320) & ellipse(*RIGHT_LUNG)
        hu[region] = -600.0
        septa = region & ((np.round(YY) % 7 == 0) | (np.round(XX) % 7 == 0))  # thickened septa, 5 mm apart
        hu[septa] = -100.0
        return region

    hus, masks, positions = series(paint)
    g = grade(measured(hus, masks), 1, positions)
    assert g.category == "indeterminate", g
    assert g.reasons[0] == "unilateral (right)" and g.reasons[1].startswith("peripheral")
    assert g.reasons[2].startswith("ground glass") and "single focus" in g.reasons
    assert g.regions["RLL"] >= 2 and g.regions["LUL"] == g.regions["LLL"] == 0
    per = [solid_components(hu, LUNG_BOX, PX) for hu in hus]
    assert link_solids(per, positions, [LUNG_BOX] * len(hus)) == []


def test_no_lesion_or_no_focus_is_negative():
    hus, masks, positions = series(lambda k, hu: None, n=6)
    g = grade(measured(hus, masks), 0, positions)
    assert g.category == "negative" and g.severity == 0 and g.extent["total"] == 0
    assert grade([None] * 3, 0, [0.0, -5.0, -10.0]).category == "negative"


def test_region_score_and_round_trips():
    assert [region_score(p) for p in (0, 0.1, 4.9, 5, 25, 26, 49, 50, 75, 76, 100)] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    m = SliceMeasures(1.9775, 4000, 4100, 120, 10, 100, 20, 90, 40)
    assert SliceMeasures.from_dict(m.to_dict()) == m and m.lesion == 130 and m.lung == 8100
    g = Grade("typical", ["bilateral"], 3, {"RUL": 1}, {"total": 1.5}, {"right upper": 2.0}, 4.5, 80.0, 70.0)
    assert Grade.from_dict(g.to_dict()) == g
    assert g.describe() == "typical (bilateral); severity 3/25"


def test_measure_slice_counts_sides_density_and_distribution():
    hu = chest(0)
    les = ggo_patch(hu, 385, 150, 30, 0)  # right (image left), posterior: peripheral ground glass
    m = measure_slice(hu, LUNGS, les, PX)
    assert m.lesion_right > 0 and m.lesion_left == 0
    assert m.lung_right > m.lesion_right and abs(m.lung_right - m.lung_left) < 0.05 * m.lung
    assert m.ggo >= 0.95 * m.lesion and m.consolidation <= 0.05 * m.lesion and m.peripheral > 0.8 * m.lesion
    assert measure_slice(hu, np.zeros_like(LUNGS), les, PX).lung == 0


def test_consolidation_the_lung_mask_left_out_counts_as_lung_and_lesion():
    """The valid-area region is aerated lung: a dependent consolidation lies outside it, yet is lung and lesion."""
    hu = chest(0)
    dense = ellipse(*RIGHT_LUNG) & (YY > 330)  # the posterior third of the right lung, consolidated
    hu[dense] = 20.0
    aerated = LUNGS & ~dense  # what the valid-area model holds
    m = measure_slice(hu, aerated, dense, PX)
    whole = measure_slice(hu, LUNGS, dense, PX)
    assert m.lesion_right > 0 and m.consolidation >= 0.95 * m.lesion, m
    assert (m.lung_right, m.lesion_right, m.consolidation) == (whole.lung_right, whole.lesion_right,
                                                               whole.consolidation)
    assert m.lesion_right > 0.2 * m.lung_right  # a third of the right lung, not the sliver at the mask's edge


def test_measure_slice_is_fast():
    hu = chest(0)
    les = ggo_patch(hu, 385, 150, 30, 0)
    measure_slice(hu, LUNGS, les, PX)
    t = time.perf_counter()
    for _ in range(20):
        measure_slice(hu, LUNGS, les, PX)
    ms = (time.perf_counter() - t) * 1000 / 20
    print(f"measure_slice: {ms:.2f} ms per 512² slice with lesion")
    assert ms < 15  # ~1 ms on one core of the 2-core reference machine; generous for a shared CI runner


def test_analyzer_batch_fills_solids_and_measures_for_hu_slices_only(analyzer):
    from appliance.phantom import PhantomSpec, phantom_series

    spec = PhantomSpec(slices=8)
    slices = [SliceImage(key=f"s{k}", series_uid="x", study_uid="y", position=-5.0 * k, hu=hu,
                         pixel_spacing=(spec.spacing_mm, spec.spacing_mm)) for k, hu in enumerate(phantom_series(spec))]
    crop = SliceImage(key="crop", series_uid="c", study_uid="c", position=0.0,
                      window01=np.full((200, 240), 0.2, np.float32))
    fs = analyzer.batch(slices + [crop])
    lung = [f for f in fs[:-1] if f.lung is not None]
    assert lung and all(f.measures is not None and f.measures.lung > 0 for f in lung)
    assert all(isinstance(f.solids, list) for f in fs)
    assert fs[-1].measures is None and fs[-1].solids == []
    assert "measures" in fs[0].timings_ms
    print(f"solids + measures: {fs[0].timings_ms['measures']:.2f} ms per slice in this batch")


# --- real series --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series_cache():
    return {}


def graded(analyzer, findings) -> Grade:
    from appliance.pipeline.solid_lesions import explain

    per, lesions, foci = solid_view(analyzer, findings)
    by = [explain(m, lesions, per) for m in foci]
    return grade([f.measures for f in findings], sum(1 for b in by if b is None), [f.position for f in findings],
                 [b for b in by if b is not None])


def test_real_covid_p001_grade_typical_or_indeterminate_with_plausible_extent(analyzer, series_cache):
    _, findings = real_series(analyzer, series_cache, "covid-ct-md", "P001")
    g = graded(analyzer, findings)
    print(g.describe(), g.extent, g.regions)
    assert g.category in ("typical", "indeterminate")
    assert g.reasons[0] == "bilateral" and g.ground_glass_pct > 60
    assert 0.5 <= g.extent["total"] <= 25
    # the radiologists' lobe labels: both lower lobes (39 and 48 slices), right middle and upper lobes a little
    assert g.regions["RLL"] >= 1 and g.regions["LLL"] >= 1 and g.severity <= 12


def test_real_cap001_is_graded_with_reasons(analyzer, series_cache):
    _, findings = real_series(analyzer, series_cache, "covid-ct-md", "cap001")
    g = graded(analyzer, findings)
    print(g.describe(), g.extent, g.regions)
    assert g.category in ("typical", "indeterminate", "atypical") and len(g.reasons) >= 4
    assert g.regions["LLL"] >= 1 and 0.5 <= g.extent["total"] <= 40  # labels: both lower lobes



def test_foci_too_small_to_measure_are_indeterminate_not_ungraded():
    """A positive always carries a category: foci whose measured lesion is below 0.1 ml in all get
    'indeterminate (minimal lesion)'; the same measures without a focus are no lesion (negative)."""
    def speck(k, hu):  # a 3 mm speck in each lung on one slice: under 0.1 ml
        return None if k != 5 else ggo_patch(hu, 385, 150, 2.2, k) | ggo_patch(hu, 385, 362, 2.2, k + 9)

    hus, masks, positions = series(speck)
    ms = measured(hus, masks)
    g = grade(ms, 2, positions)
    assert g.category == "indeterminate" and 0 < g.lesion_ml < 0.1, g
    assert g.reasons[0].startswith("minimal lesion (0.0") and g.reasons[1] == "multifocal (2 foci)"
    assert g.severity == sum(g.regions.values()) <= 5  # measured as ever: a speck scores 0-1 per region
    none = grade(ms, 0, positions)
    assert none.category == "negative" and none.reasons == ["no lesion"] and none.severity == 0
