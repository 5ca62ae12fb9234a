"""Series coverage: whole chest series against the part of one a paused export leaves."""
from __future__ import annotations

from appliance.domain import Rect, SliceFinding, SliceMeasures
from appliance.pipeline.coverage import lung_areas, missing_slices, partial_reason


def chest(n: int = 40, spacing: float = 2.5) -> list[SliceFinding]:
    """A whole chest series, head → feet: no lung on the first and last slices, largest in the middle."""
    out = []
    for k in range(n):
        t = (k + 0.5) / n
        half = max(0.0, 1 - abs(t - 0.5) / 0.42)  # lung from t 0.08 to 0.92
        r = int(180 * half)
        lung = Rect(256 - r, 256 - r, 256 + r, 256 + r) if r > 4 else None
        out.append(SliceFinding(f"s{k}", -k * spacing, (512, 512), lung))
    return out


def test_whole_series_is_not_partial():
    assert partial_reason(chest()) is None


def test_series_cut_in_the_middle_goes_on_below_the_last_slice():
    s = chest()
    assert partial_reason(s[:22]) == "the lung goes on below the last slice received"
    assert partial_reason(s[18:]) == "the lung goes on above the first slice received"
    assert partial_reason(s[15:25]) == "the lung goes on above the first and below the last slice received"


def test_missing_slices_are_counted_and_located():
    s = chest()
    holey = s[:10] + s[13:]  # slices at -25, -27.5, -30 mm missing
    assert missing_slices([f.position for f in holey]) == (3, -32.5, -22.5)
    assert partial_reason(holey) == "3 slices missing between z -32.5 and -22.5 mm"
    one = s[:10] + s[11:]
    assert partial_reason(one) == "1 slice missing between z -27.5 and -22.5 mm"


def test_uneven_but_complete_positions_and_duplicates_are_not_gaps():
    s = chest()
    for f, d in zip(s, [0.0, 0.1, -0.1] * 20):  # positions rounded by the scanner
        f.position += d
    twice = s + [SliceFinding("dup", s[5].position, (512, 512), s[5].lung)]
    assert partial_reason(twice) is None


def test_no_lung_or_too_few_slices_is_nothing_to_wait_for():
    abdomen = [SliceFinding(f"s{k}", -k, (512, 512), None) for k in range(30)]
    assert partial_reason(abdomen) is None
    assert partial_reason(chest()[18:20]) is None


def test_lung_area_from_measures_where_every_slice_has_them():
    s = chest(10)
    assert lung_areas(s)[0] == 0 and lung_areas(s).max() > 0
    for f in s:
        f.measures = SliceMeasures(pixel_mm2=0.5, lung_right=100, lung_left=50)
    assert list(lung_areas(s)) == [75.0] * 10
    assert partial_reason(s) == "the lung goes on above the first and below the last slice received"


def test_a_cut_near_the_lungs_end_looks_whole_but_not_ended():
    s = chest()[:32]  # the last slice holds about a tenth of the largest lung area: a tight scan looks like this
    share = lung_areas(s)[-1] / lung_areas(s).max()
    assert 0.05 < share < 0.25
    assert partial_reason(s) is None
    assert partial_reason(s, end_share=0.05) == "the lung goes on below the last slice received"
