"""Solid nodules and masses (appliance/pipeline/solid.py): synthetic HU phantoms built here, then real series."""
from __future__ import annotations

import glob
import re
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy import ndimage as ndi

from appliance.domain import Box, Rect, SliceFinding
from appliance.domain import Core, Solid
from appliance.pipeline.solid import solid_components
from appliance.pipeline.solid_lesions import SolidLesion, explain, focus_members, link_solids

from .conftest import shared_data
from .reference import slice_groups

PX = 0.7  # mm per pixel
N = 512
LUNG_BOX = Rect(95, 55, 417, 457)
RIGHT_LUNG = (256.0, 150.0, 155.0, 92.0)  # cy, cx, ry, rx (pixels): the patient's right lung, image left
LEFT_LUNG = (256.0, 362.0, 155.0, 92.0)
YY, XX = np.mgrid[:N, :N].astype(np.float32)


def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((YY - cy) / ry) ** 2 + ((XX - cx) / rx) ** 2 <= 1.0


def chest(seed: int = 0) -> np.ndarray:
    """An axial chest slice in display orientation: body, two aerated lungs with texture, a mediastinum."""
    rng = np.random.default_rng(seed)
    hu = np.full((N, N), -1000.0, np.float32)
    hu[ellipse(256, 256, 200, 245)] = 40.0
    lungs = ellipse(*RIGHT_LUNG) | ellipse(*LEFT_LUNG)
    texture = ndi.gaussian_filter(rng.normal(0, 1, (N, N)).astype(np.float32), 1.0) * 60.0
    hu[lungs] = -860.0 + texture[lungs]
    return hu + rng.normal(0, 8, (N, N)).astype(np.float32)


def add_ball(hu: np.ndarray, cy: float, cx: float, r_mm: float, halo_mm: float = 0.0, spicules: int = 0,
             core_hu: float = 35.0) -> Rect | None:
    """A solid section of radius r_mm at (cy, cx) px, with a ground-glass halo and thin spicules; returns the
    rect the lesion model would box (core + halo), or None when the section is empty."""
    if r_mm <= 0:
        return None
    r, h = r_mm / PX, (r_mm + halo_mm) / PX
    d2 = (YY - cy) ** 2 + (XX - cx) ** 2
    lung = hu < -500
    if halo_mm:
        hu[(d2 <= h * h) & lung] = -480.0
    ang = np.arctan2(YY - cy, XX - cx)
    for k in range(spicules):  # spicules: 1 px wide lines reaching 8 mm beyond the core
        a = 2 * np.pi * k / spicules
        line = (np.abs(np.sin(ang - a)) * np.sqrt(d2) < 0.8) & (np.cos(ang - a) > 0) & (d2 <= (r + 8 / PX) ** 2)
        hu[line] = np.maximum(hu[line], -60.0)
    hu[d2 <= r * r] = core_hu
    return Rect(int(cy - h), int(cx - h), int(np.ceil(cy + h)), int(np.ceil(cx + h)))


def sphere_series(n: int, spacing: float, balls: list[tuple[float, float, float, float]], halo_mm: float = 5.0,
                  spicules: int = 8) -> tuple[list[np.ndarray], list[float], dict[int, list[Rect]]]:
    """n slices, head → feet; balls: (cy px, cx px, z mm, radius mm). Returns slices, positions, halo boxes."""
    slices, positions, boxes = [], [], {}
    for k in range(n):
        z = -k * spacing
        hu = chest(k)
        for cy, cx, cz, rad in balls:
            dz = abs(z - cz)
            r = float(np.sqrt(max(rad * rad - dz * dz, 0.0)))
            rect = add_ball(hu, cy, cx, r, halo_mm, spicules)
            if rect is not None:
                boxes.setdefault(k, []).append(rect)
        slices.append(hu)
        positions.append(z)
    return slices, positions, boxes


def solids_of(slices: list[np.ndarray]) -> list[list[Solid]]:
    return [solid_components(hu, LUNG_BOX, PX) for hu in slices]


def lesions_of(slices, positions) -> tuple[list[list[Solid]], list[SolidLesion]]:
    per = solids_of(slices)
    return per, link_solids(per, positions, [LUNG_BOX] * len(slices))


def members(boxes: dict[int, list[Rect]], near: tuple[float, float] | None = None) -> list[tuple[int, Rect]]:
    out = []
    for i, rs in sorted(boxes.items()):
        for r in rs:
            if near is None or abs(r.center[0] - near[0]) + abs(r.center[1] - near[1]) < 60:
                out.append((i, r))
    return out


# --- synthetic ----------------------------------------------------------------------------------------------


def test_spiculated_mass_with_halo_is_a_mass_and_explains_its_focus():
    # a 34 mm spiculated mass in the patient's right upper zone on 5 slices of 6 mm, ground-glass halo around it
    slices, positions, boxes = sphere_series(12, 6.0, [(200.0, 150.0, -18.0, 17.0)])
    assert len(boxes) == 5
    per, found = lesions_of(slices, positions)
    assert len(found) == 1
    m = found[0]
    assert m.kind == "mass" and 30 <= m.diameter_mm <= 40
    assert (m.first_slice, m.last_slice) == (1, 5)
    assert m.quadrant == "upper-left" and m.side == "right" and m.zone == "upper"
    assert -10 < m.mean_hu < 60
    assert m.describe() == f"solid mass {m.diameter_mm:.0f} mm, patient's right upper zone — not a COVID-19 pattern"
    focus = members(boxes)
    assert explain(focus, found, per) == m
    d = m.to_dict()
    assert d["kind"] == "mass" and d["first_slice"] == 1 and d["text"] == m.describe()


def test_lidc_like_nodules_on_thin_slices_are_nodules_and_explained():
    # a 6 mm and a 10 mm nodule with a ground-glass halo, 1.25 mm slices, one in each lung
    balls = [(220.0, 140.0, -10.0, 3.0), (300.0, 380.0, -12.0, 5.0)]
    slices, positions, boxes = sphere_series(20, 1.25, balls, halo_mm=5.0, spicules=6)
    per, found = lesions_of(slices, positions)
    assert len(found) == 2, found
    small, big = sorted(found, key=lambda s: s.diameter_mm)
    assert small.kind == big.kind == "nodule"
    assert 5 <= small.diameter_mm <= 9 and 9 <= big.diameter_mm <= 13
    assert small.side == "right" and big.side == "left"
    assert explain(members(boxes, (220, 140)), found, per) == small
    assert explain(members(boxes, (300, 380)), found, per) == big


def test_vessels_moving_across_slices_are_not_solid_lesions():
    # tubes of 4–6 mm: one oblique (moving 2 px a slice), one along z, one branching off; 1.25 mm slices
    slices, positions = [], []
    for k in range(24):
        hu = chest(k)
        for cy, cx, r_mm in ((180 + 2 * k, 120 + k, 2.5), (300, 160, 3.0), (250 - 3 * k, 380, 2.0),
                             (250 - 3 * k, 380 + 2 * k, 2.0)):
            hu[(YY - cy) ** 2 + (XX - cx) ** 2 <= (r_mm / PX) ** 2] = 40.0
        slices.append(hu)
        positions.append(-1.25 * k)
    per, found = lesions_of(slices, positions)
    assert any(per), "vessel sections are components on single slices"
    assert found == []


@pytest.mark.parametrize("r_mm", [17.0, 6.0])
def test_mass_on_the_chest_wall_is_attached_not_an_intrapulmonary_mass(r_mm):
    # a 34 mm mass / 12 mm nodule centred on the lateral edge of the right lung: broad-based on the chest wall.
    # The small one lies in the envelope (the closing fills its pocket) and is attached there; the big one is a
    # concavity of the lung, outside the envelope. Neither is a solid lesion.
    cx = RIGHT_LUNG[1] - RIGHT_LUNG[3] + 4
    slices, positions, boxes = sphere_series(12 if r_mm > 10 else 24, 6.0 if r_mm > 10 else 1.25,
                                             [(256.0, cx, -30.0 if r_mm > 10 else -15.0, r_mm)], spicules=0)
    per, found = lesions_of(slices, positions)
    near = [s for i in boxes for s in per[i] if abs(s.rect.center[1] - cx) < 40]
    assert all(s.attached for s in near)
    if r_mm < 10:
        assert len(near) >= 3
    assert found == []
    assert explain(members(boxes), found, per) is None


def test_a_lung_region_whose_edge_cuts_beside_a_pleural_nodule_still_holds_it(monkeypatch):
    # a 16 mm nodule 5 mm from the posterior pleura; the lung region (the valid-area model's coarse mask) stops
    # 8 mm short of the pleura, cutting the aerated lung around the nodule. The region is grown before it
    # limits the lung, so the nodule is found as without a region; taken as it is, the nodule is lost.
    import appliance.pipeline.solid as solid

    cy = RIGHT_LUNG[0] + RIGHT_LUNG[2] - (8.0 + 5.0) / PX
    slices, positions, _ = sphere_series(12, 2.5, [(cy, 150.0, -15.0, 8.0)], halo_mm=3.0, spicules=6)
    region = ndi.binary_erosion(ellipse(*RIGHT_LUNG) | ellipse(*LEFT_LUNG), iterations=int(8.0 / PX))

    def found(mask):
        per = [solid_components(hu, LUNG_BOX, PX, mask) for hu in slices]
        return [(s.kind, s.diameter_mm, s.first_slice, s.last_slice)
                for s in link_solids(per, positions, [LUNG_BOX] * len(slices))]

    free = found(None)
    assert len(free) == 1 and free[0][0] == "nodule" and 14 <= free[0][1] <= 18
    assert found(region) == free
    monkeypatch.setattr(solid, "MASK_GROW_MM", 0.0)
    assert found(region) != free


def test_wide_ground_glass_patch_around_a_small_nodule_is_not_explained_by_it():
    slices, positions, boxes = sphere_series(20, 1.25, [(250.0, 150.0, -12.0, 4.0)])
    per, found = lesions_of(slices, positions)
    assert len(found) == 1
    patch = [(i, Rect(150, 70, 350, 230)) for i in range(4, 16)]  # a 14 cm patch holding the nodule
    assert explain(patch, found, per) is None


def test_link_drops_single_slice_and_flat_objects_and_keeps_members():
    s = Solid(Rect(100, 100, 120, 120), 200.0, 14.0, 30.0, False, 0.7, 0.1)
    assert link_solids([[s]], [0.0]) == []  # one slice: its 3-D shape cannot be judged
    assert link_solids([[s], [s]], [0.0, -0.5]) == []  # 14 mm wide, 1 mm deep: flat
    found = link_solids([[s], [s], [s], [s]], [0.0, -5.0, -10.0, -15.0])
    assert len(found) == 1 and found[0].members == ((0, 0), (1, 0), (2, 0), (3, 0))


def test_solid_round_trip_is_compact_and_json_safe():
    import json

    s = Solid(Rect(1, 2, 30, 40), 123.4, 14.2, 35.0, True, 0.7031, 0.12)
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d and len(json.dumps(d)) < 100
    assert Solid.from_dict(d) == s


def test_findings_round_trip_with_solids_and_measures_and_old_records_load():
    from appliance.pipeline.grading import SliceMeasures
    from appliance.store import finding_from_dict, finding_to_dict

    f = SliceFinding("k", -5.0, (512, 512), Rect(10, 10, 400, 500), [Box(Rect(1, 2, 3, 4), 50.0, 0.95, "upper-left")],
                     solids=[Solid(Rect(1, 2, 30, 40), 123.4, 14.2, 35.0, False, 0.7031, 0.12)],
                     cores=[Core(Rect(5, 6, 40, 50), 451.2, 14.1, 28.0)],
                     measures=SliceMeasures(1.9775, 4000, 4100, 120, 0, 100, 20, 90, 30))
    assert finding_from_dict(finding_to_dict(f)) == f
    old = finding_to_dict(f)
    del old["solids"], old["measures"], old["cores"]
    g = finding_from_dict(old)
    assert g.solids == [] and g.measures is None and g.cores == []


def test_solid_components_is_fast():
    slices, _, _ = sphere_series(4, 5.0, [(200.0, 150.0, -5.0, 10.0)])
    solid_components(slices[0], LUNG_BOX, PX)
    t = time.perf_counter()
    for _ in range(5):
        for hu in slices:
            solid_components(hu, LUNG_BOX, PX)
    ms = (time.perf_counter() - t) * 1000 / 20
    print(f"solid_components: {ms:.2f} ms per 512² slice")
    assert ms < 15  # ~2 ms on one core of the 2-core reference machine; generous for a shared CI runner


# --- real series --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series_cache():
    return {}


def real_series(analyzer, cache: dict, *parts: str):
    """(slices (headers, series order), findings) of the largest series under shared data `parts`."""
    from appliance.oneshot import analyze_path

    folder = shared_data(*parts)
    if folder not in cache:
        reports, _ = analyze_path(folder, analyzer, b"test")
        r = max(reports, key=lambda r: len(r.findings))
        cache[folder] = (r.slices, r.findings)
    return cache[folder]


def solid_view(analyzer, findings):
    per = [f.solids for f in findings]
    lesions = link_solids(per, [f.position for f in findings], [f.lung for f in findings])
    from appliance.pipeline.case_logic import slices_needed

    need = slices_needed(findings, analyzer.rule.min_run, analyzer.rule.min_run_mm)
    foci = [m for m in focus_members(findings) if m[-1][0] - m[0][0] + 1 >= need]
    return per, lesions, foci


def lidc_contours(n: int) -> list[tuple[float, Rect]]:
    """(z, bounding rect) of every radiologist contour of LIDC-IDRI-000n (display = DICOM pixel order)."""
    ns = "{http://www.nih.gov}"
    path = glob.glob(str(shared_data("lidc-idri-samples", "full", f"LIDC-IDRI-000{n}") / "*" / "*" / "*.xml"))[0]
    out = []
    for roi in ET.parse(path).getroot().iter(ns + "roi"):
        xs = [int(e.find(ns + "xCoord").text) for e in roi.iter(ns + "edgeMap")]
        ys = [int(e.find(ns + "yCoord").text) for e in roi.iter(ns + "edgeMap")]
        if len(xs) >= 20:  # a nodule ≥ 3 mm drawn as a contour, not a small-nodule point
            out.append((float(roi.find(ns + "imageZposition").text), Rect(min(ys), min(xs), max(ys) + 1, max(xs) + 1)))
    return out


def _overlaps(a: Rect, b: Rect) -> bool:
    return a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1


@pytest.mark.parametrize("n", [1, 3])
def test_real_lidc_nodule_found_and_its_focus_explained(analyzer, series_cache, n):
    """The nodule is found; the lesion focus on its halo is explained by it; the verdict names it, not positive."""
    from appliance.pipeline.case_logic import decide

    slices, findings = real_series(analyzer, series_cache, "lidc-idri-samples", "small", f"LIDC-IDRI-000{n}")
    per, lesions, foci = solid_view(analyzer, findings)
    contours = lidc_contours(n)
    z_of = {round(s.position, 2): i for i, s in enumerate(slices)}
    annotated = {(z_of[round(z, 2)], r) for z, r in contours if round(z, 2) in z_of}
    hits = [s for s in lesions
            if any(_overlaps(per[i][k].rect, r) for i, k in s.members for j, r in annotated if j == i)]
    assert hits, f"LIDC-IDRI-000{n}: no solid lesion on the annotated nodule ({lesions})"
    nodule = hits[0]
    assert nodule.kind == "nodule" and 12 <= nodule.diameter_mm < 30
    assert foci and all(explain(m, lesions, per) == nodule for m in foci)
    assert len(lesions) <= 2  # no crowd of vessels reported beside it
    v = decide(findings, analyzer.rule)
    assert v.result != "positive" and any("solid nodule" in str(o) for o in v.others), v.others


def test_real_lidc_0002_ground_glass_pole_is_not_a_solid_lesion(analyzer, series_cache):
    # the run holds only the upper, ground-glass part of the nodule (HU < -100 but for specks): not solid
    _, findings = real_series(analyzer, series_cache, "lidc-idri-samples", "small", "LIDC-IDRI-0002")
    _, lesions, _ = solid_view(analyzer, findings)
    assert lesions == []
    # what the verdict says instead: too short to call, and the lesion it shows (the nodule's pole, on the last
    # slices of the run: the nodule goes on below it)
    from appliance.pipeline.case_logic import decide

    v = decide(findings, analyzer.rule)
    assert v.result == "indeterminate" and v.others == [] and v.focal is None
    m = re.search(r"; lesion seen on slices (\d+)–(\d+), about (\d+) mm across \(patient's left, posterior, image "
                  r"lower-right\)", v.reason)  # the annotated nodule: image x 331-365, y 352-370 on those slices
    assert m and int(m.group(2)) == len(findings) and 10 <= int(m.group(3)) <= 40, v.reason
    assert "may continue beyond this series" in v.reason


def a0001_tumour(slices) -> dict[int, Rect]:
    out = {}
    idx = {s.sop_uid: i for i, s in enumerate(slices)}
    for p in glob.glob(str(shared_data("lung-pet-ct-dx-A0001", "Annotation", "A0001") / "*.xml")):
        uid = re.sub(r"\.xml$", "", p.rsplit("/", 1)[-1])
        if uid in idx:
            t = open(p).read()
            x0, y0, x1, y1 = (int(re.search(f"<{k}>(\\d+)", t).group(1)) for k in ("xmin", "ymin", "xmax", "ymax"))
            out[idx[uid]] = Rect(y0, x0, y1, x1)
    return out


def test_real_a0001_tumour_focus_is_not_called_viral(analyzer, series_cache):
    """The tumour's halo is one focus; no stray solid lesion explains it away, and the grade is not typical."""
    from appliance.pipeline.grading import grade

    slices, findings = real_series(analyzer, series_cache, "lung-pet-ct-dx-A0001")
    tumour = a0001_tumour(slices)
    assert len(tumour) >= 8
    per, lesions, foci = solid_view(analyzer, findings)
    on_tumour = [m for m in foci if sum(1 for i, r in m if i in tumour and _overlaps(r, tumour[i])) >= 3]
    assert len(on_tumour) == 1
    assert all(s.diameter_mm < 10 for s in lesions)  # at most a vessel-sized stray, nowhere near the tumour
    g = grade([f.measures for f in findings], len(foci), [f.position for f in findings])
    assert g.category != "typical" and "unilateral (left)" in g.reasons


@pytest.mark.xfail(strict=False, reason=(
    "A0001's tumour is broad-based on the posterior chest wall and the aorta on every slice (no fat plane), so by"
    " HU alone its solid part is continuous with the chest wall / mediastinum: attached, not reported as an "
    "intrapulmonary mass. Telling it from the heart, aorta and hila needs anatomy the HU rule does not have. "
    "Measured (branch mass, 2026-12-04), three bulge rules that do not separate it: (1) soft tissue inside the "
    "per-side convex hull of the aerated lung holds the whole mediastinum on every slice (each lung is a crescent"
    " around it); (2) that soft tissue cut to the lesion boxes grown by 10 mm is 10-37 mm thick on the tumour "
    "(0-based slices 12-21) but also 12-15 mm thick on 11 consecutive slices of P001's right liver dome (0-based "
    "slices 116-126, under a basal ground-glass box) and 19-25 mm on cap001's consolidation; (3) 'aerated lung "
    "below the last section' fails on the tumour itself (10 mm below, 63-83 % of its section's rect is still not "
    "aerated lung) while cap001's consolidation at 0-based slices 124-125 has 56-65 % aerated lung below. A 3-D "
    "envelope (the lung on the slices above and below) needs a per-slice lung grid the findings do not carry, "
    "and a closing wide enough to bridge a 50-65 mm mass would swallow the 25-30 mm aorta too. Also checked "
    "(2026-12-05): the valid-area model's lung region leaves the tumour out as it does the aorta and heart, and "
    "the soft tissue inside the lesion map is at most 7 mm thick on the tumour (the map covers its halo), as on "
    "the LIDC nodules. Measured (2026-12-07), the 3-D envelope: soft tissue (>= -100 HU, opened by 3 mm) where "
    "aerated lung (classic_lung) lies both within 40 mm above and within 40 mm below finds the tumour on 13 "
    "slices (up to 653 mm2), but nearly as large components elsewhere too (A0001: 565-568 mm2 on 0-based "
    "slices 32 and 41, away from the tumour; P001 99 components up to 851 mm2, 7 beside its COVID-19 boxes; "
    "cap001 173, 63 beside its pneumonia boxes, up to 820 mm2): lung above and below does not single out a mass "
    "(not located further: no anatomy labels here). The probe is not kept: nothing in the appliance uses it. "
    "Since 2026-12-07 the verdict names A0001's tumour a solid mass another way, through the soft-tissue core its "
    "halo wraps (appliance/pipeline/halo_core.py, test_real_halo_cores_name_the_tumour_and_nothing_in_the_"
    "pneumonias); and a focus that wraps such a core is since taken out of the count (appliance/pipeline/mass_foci.py), but the solid stage itself still does not report this tumour, so this test stays as it was."))
def test_real_a0001_solid_mass_found_and_explains_the_tumour_focus(analyzer, series_cache):
    slices, findings = real_series(analyzer, series_cache, "lung-pet-ct-dx-A0001")
    tumour = a0001_tumour(slices)
    per, lesions, foci = solid_view(analyzer, findings)
    masses = [s for s in lesions if s.kind == "mass"
              and any(i in tumour and _overlaps(per[i][k].rect, tumour[i]) for i, k in s.members)]
    assert masses
    assert any(explain(m, lesions, per) in masses for m in foci)


def test_real_halo_cores_name_the_tumour_and_nothing_in_the_pneumonias(analyzer, series_cache):
    """appliance/pipeline/halo_core.py on real series: A0001's halo wraps a mass-sized core on its tumour, inside
    the focal run; no focus of the COVID-19 series P001 or the pneumonia cap001 wraps one (measured: P001 none of
    100 mm², cap001 at most 118 mm²; the mass needs 300)."""
    from appliance.pipeline.case_logic import decide
    from appliance.pipeline.halo_core import MASS_CORE_MM2, is_mass_core

    slices, findings = real_series(analyzer, series_cache, "lung-pet-ct-dx-A0001")
    tumour = a0001_tumour(slices)
    masses = [(i, c) for i, f in enumerate(findings) for c in f.cores if is_mass_core(c)]
    assert masses and all(i in tumour and _overlaps(c.rect, tumour[i]) for i, c in masses), masses
    v = decide(findings, analyzer.rule)
    assert v.result == "negative" and v.focal.first_slice <= masses[0][0] <= v.focal.last_slice
    assert [o["kind"] for o in v.others] == ["mass"] and v.reason.startswith("a solid mass")
    for parts in (("covid-ct-md", "P001"), ("covid-ct-md", "cap001")):
        _, fs = real_series(analyzer, series_cache, *parts)
        largest = max((c.area_mm2 for f in fs for c in f.cores), default=0.0)
        assert largest < MASS_CORE_MM2 / 2, (parts, largest)


def test_real_covid_p001_foci_stay_unexplained(analyzer, series_cache):
    _, findings = real_series(analyzer, series_cache, "covid-ct-md", "P001")
    per, lesions, foci = solid_view(analyzer, findings)
    assert len(foci) >= 4
    explained = [m for m in foci if explain(m, lesions, per) is not None]
    assert len(explained) <= 1 and len(foci) - len(explained) >= 2
    assert all(s.diameter_mm < 20 for s in lesions)


def test_link_solids_groups_sections_as_the_section_by_section_definition():
    """The vectorised linking against the definition: sections on slices ≤ skip + 1 apart, linked all the way,
    overlapping by ≥ min_overlap of the smaller one, are one object (then filtered as link_solids does)."""
    from appliance.geometry import links, median_spacing
    from appliance.pipeline.solid_lesions import _lesion

    rng = np.random.default_rng(11)
    kept = 0
    for trial in range(40):
        n = int(rng.integers(2, 20))
        positions = (50.0 - np.cumsum(rng.choice([3.0, 3.0, 3.0, 10.0], size=n))).tolist()
        per = []
        for _ in range(n):
            row = []
            for _ in range(int(rng.choice([0, 1, 2, 3]))):
                y, x = (int(v) for v in rng.integers(100, 140, size=2))
                h, w = (int(v) for v in rng.integers(8, 30, size=2))
                row.append(Solid(Rect(y, x, y + h, x + w), h * w * 0.49, 0.7 * max(h, w), 20.0, False, 0.7, 0.1))
            per.append(row)
        for skip, min_overlap in ((2, 0.2), (0, 0.5)):
            ids = [(i, k) for i in range(n) for k in range(len(per[i]))]

            def overlaps(x: tuple[int, int], y: tuple[int, int]) -> bool:
                r, s = per[x[0]][x[1]].rect, per[y[0]][y[1]].rect
                h = min(r.y1, s.y1) - max(r.y0, s.y0)
                w = min(r.x1, s.x1) - max(r.x0, s.x0)
                share = h * w / max(1, min(r.height * r.width, s.height * s.width)) if h > 0 and w > 0 else 0
                return share >= min_overlap

            groups = slice_groups(ids, links(positions), skip + 1, overlaps)
            lungs = [LUNG_BOX] * n
            spacing = median_spacing(positions)
            want = [les for g in groups
                    if (les := _lesion(g, per, positions, lungs, positions, spacing)) is not None]
            want.sort(key=lambda s: (-s.diameter_mm, s.first_slice))
            got = link_solids(per, positions, lungs, skip=skip, min_overlap=min_overlap)
            assert got == want, (trial, skip, min_overlap)
            kept += len(want)
    assert kept >= 10  # the random series make real objects (15 with this seed), not only ones the filters drop
