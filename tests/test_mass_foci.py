"""appliance.pipeline.mass_foci: which lesion foci are a mass' halo (taken out of the count, named), pure."""
import dataclasses

from appliance.domain import Box, Core, Rect, SliceFinding, SliceMeasures
from appliance.pipeline.mass_foci import MASS_Z_RATIO, MAX_SLICE_LESION, explain_masses, mass_core

TUMOUR = Rect(300, 330, 370, 400)  # 70 px = 49 mm at 0.7 mm pixels
PATCH = Rect(100, 80, 150, 140)
CORE = Core(Rect(320, 340, 350, 380), 450.0, 14.0, 30.0)
FOCAL = SliceMeasures(0.49, lung_right=20000, lung_left=20000, lesion_left=4400)  # 11 % of the lungs: A0001's slice


def diffuse(share: float) -> SliceMeasures:
    """Lesion over `share` of both lungs (COVID-19-NY-SBU slices with a hilum in a lesion's hull: 40–100 %)."""
    return SliceMeasures(0.49, lung_right=20000, lung_left=20000, lesion_right=int(20000 * share),
                         lesion_left=int(20000 * share))


def series(spacing: float, tumour: range, patch: range = range(0), core_at: int | None = None,
           core: Core = CORE) -> list[SliceFinding]:
    out = []
    for i in range(30):
        boxes = ([Box(TUMOUR, 900.0, 0.9, "lower-right")] if i in tumour else []) + (
            [Box(PATCH, 300.0, 0.8, "upper-left")] if i in patch else [])
        out.append(SliceFinding(f"s{i}", -spacing * i, (512, 512), Rect(0, 0, 512, 512), boxes, pixel_mm=0.7,
                                cores=[core] if i == core_at else [], measures=FOCAL))
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
        # bilateral disease over most of the lungs on the core's slice: the hull holds a hilum, not a mass
        "diffuse disease": [dataclasses.replace(f, measures=diffuse(0.4)) if f.cores else f
                            for f in series(5.0, range(10, 16), core_at=12)],
        "no measures": [dataclasses.replace(f, measures=None) for f in series(5.0, range(10, 16), core_at=12)],
        "too short to count": series(5.0, range(10, 12), core_at=11),
        # 15 slices of 5 mm: 75 mm along z > 1.5 × 49 mm — a confluent consolidation, not a round mass
        "longer than wide": series(5.0, range(10, 25), core_at=12),
    }
    for name, fs in cases.items():
        kept, masses = explain_masses(fs, need=3)
        assert masses == [] and kept == fs, name
    assert 15 * 5.0 > MASS_Z_RATIO * 49.0 > 6 * 5.0
    at_limit = [dataclasses.replace(f, measures=diffuse(MAX_SLICE_LESION)) for f in series(5.0, range(10, 16),
                                                                                         core_at=12)]
    assert len(explain_masses(at_limit, need=3)[1]) == 1, "up to the limit a core still makes a mass"


def test_mass_core_is_the_largest_mass_sized_core_inside_the_members_boxes():
    fs = series(5.0, range(10, 16), core_at=12)
    big = dataclasses.replace(CORE, area_mm2=700.0)
    fs[13] = dataclasses.replace(fs[13], cores=[dataclasses.replace(CORE, area_mm2=200.0), big])
    members = [(i, 0) for i in range(10, 16)]
    assert mass_core(fs, members) == big
    assert mass_core(fs, members[:2]) is None  # slices 10–11 hold no core


def test_real_covid_hila_wrapped_by_diffuse_disease_are_not_masses(analyzer):
    """COVID-19-NY-SBU: bilateral COVID-19 whose lesions surround the hila, so their hull holds mass-sized soft
    tissue (the hilum). Those slices are mostly lesion: no core there makes a mass, so no focus is taken out."""
    from appliance.oneshot import analyze_files, walk_files
    from appliance.pipeline.halo_core import is_mass_core
    from appliance.pipeline.mass_foci import focal_slice

    from .conftest import shared_data

    found = analyze_files(sorted(walk_files(shared_data("covid19-ny-sbu-dicom"))), analyzer, 10.0)
    hila = [f for s in found.series for f in s.findings if any(is_mass_core(c) for c in f.cores)]
    assert len(hila) >= 2, "the hull of bilateral lesions holds the hila on several of these slices"
    for f in hila:
        assert not focal_slice(f) and f.measures.lesion > 1.5 * MAX_SLICE_LESION * f.measures.lung  # 40-100 %
        assert mass_core([f], [(0, j) for j in range(len(f.boxes))]) is None
