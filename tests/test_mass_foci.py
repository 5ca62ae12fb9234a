"""appliance.pipeline.mass_foci: which lesion foci are a mass' halo (taken out of the count, named), pure."""
import dataclasses

from appliance.domain import Box, Core, Rect, SliceFinding
from appliance.pipeline.mass_foci import MASS_Z_RATIO, explain_masses, mass_core

TUMOUR = Rect(300, 330, 370, 400)  # 70 px = 49 mm at 0.7 mm pixels
PATCH = Rect(100, 80, 150, 140)
CORE = Core(Rect(320, 340, 350, 380), 450.0, 14.0, 30.0)


def series(spacing: float, tumour: range, patch: range = range(0), core_at: int | None = None,
           core: Core = CORE) -> list[SliceFinding]:
    out = []
    for i in range(30):
        boxes = ([Box(TUMOUR, 900.0, 0.9, "lower-right")] if i in tumour else []) + (
            [Box(PATCH, 300.0, 0.8, "upper-left")] if i in patch else [])
        out.append(SliceFinding(f"s{i}", -spacing * i, (512, 512), Rect(0, 0, 512, 512), boxes, pixel_mm=0.7,
                                cores=[core] if i == core_at else []))
    return out


def test_a_compact_focus_around_a_mass_core_is_taken_out_and_named():
    fs = series(5.0, range(10, 16), patch=range(20, 24), core_at=12)  # 30 mm long, 49 mm across
    kept, masses = explain_masses(fs, need=3)
    [mf] = masses
    assert (mf.mass.kind, mf.mass.first_slice, mf.mass.last_slice, mf.mass.quadrant) == ("mass", 10, 15, "lower-right")
    assert mf.mass.diameter_mm == 49.0 and mf.mass.z_mm == 30.0 and mf.core == CORE
    assert (mf.run.first_slice, mf.run.last_slice, mf.run.run, mf.run.quadrant) == (10, 15, 6, "lower-right")
    assert [len(f.boxes) for f in kept[10:16]] == [0] * 6, "the mass' boxes are out of the count"
    assert [b.rect for f in kept[20:24] for b in f.boxes] == [PATCH] * 4, "the other focus stays"
    assert kept[0] is fs[0] and len(kept) == len(fs)


def test_foci_that_are_not_a_mass_stay():
    cases = {
        "no core": series(5.0, range(10, 16)),
        "core too small": series(5.0, range(10, 16), core_at=12, core=dataclasses.replace(CORE, area_mm2=299.0)),
        "core too thin": series(5.0, range(10, 16), core_at=12, core=dataclasses.replace(CORE, thick_mm=9.9)),
        "core outside the box": series(5.0, range(10, 16), core_at=12,
                                       core=dataclasses.replace(CORE, rect=Rect(100, 100, 130, 130))),
        "core on another slice": series(5.0, range(10, 16), core_at=18),
        "too short to count": series(5.0, range(10, 12), core_at=11),
        # 15 slices of 5 mm: 75 mm along z > 1.5 × 49 mm — a confluent consolidation, not a round mass
        "longer than wide": series(5.0, range(10, 25), core_at=12),
    }
    for name, fs in cases.items():
        kept, masses = explain_masses(fs, need=3)
        assert masses == [] and kept == fs, name
    assert 15 * 5.0 > MASS_Z_RATIO * 49.0 > 6 * 5.0


def test_mass_core_is_the_largest_mass_sized_core_inside_the_members_boxes():
    fs = series(5.0, range(10, 16), core_at=12)
    big = dataclasses.replace(CORE, area_mm2=700.0)
    fs[13] = dataclasses.replace(fs[13], cores=[dataclasses.replace(CORE, area_mm2=200.0), big])
    members = [(i, 0) for i in range(10, 16)]
    assert mass_core(fs, members) == big
    assert mass_core(fs, members[:2]) is None  # slices 10–11 hold no core
