"""Halo-wrapped cores (appliance/pipeline/halo_core.py): synthetic HU slices built here, with the lesion mask the
model would draw, then the real series in ../shared/data (via test_solid's cached analyses)."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.domain import Rect
from appliance.pipeline.halo_core import MASS_CORE_MM, MASS_CORE_MM2, hull_mask, is_mass_core, wrapped_cores

PX = 0.7  # mm per pixel
N = 512
YY, XX = np.mgrid[:N, :N].astype(np.float32)
LEFT_LUNG = (256.0, 362.0, 155.0, 92.0)  # cy, cx, ry, rx: the patient's left lung (image right)


def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((YY - cy) / ry) ** 2 + ((XX - cx) / rx) ** 2 <= 1.0


def chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU slice, aerated lung): body at 40 HU, two lungs at about -860 HU."""
    rng = np.random.default_rng(seed)
    hu = np.full((N, N), -1000.0, np.float32)
    hu[ellipse(256, 256, 200, 245)] = 40.0
    lungs = ellipse(256, 150, 155, 92) | ellipse(*LEFT_LUNG)
    hu[lungs] = -860.0
    return hu + rng.normal(0, 8, (N, N)).astype(np.float32), lungs


def box_of(mask: np.ndarray) -> Rect:
    ys, xs = np.nonzero(mask)
    return Rect(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


def disk(cy: float, cx: float, r_mm: float) -> np.ndarray:
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= (r_mm / PX) ** 2


def test_hull_mask_fills_a_concave_shape_and_keeps_degenerate_ones():
    m = np.zeros((20, 20), bool)
    m[2:18, 2:5] = True
    m[15:18, 2:18] = True  # an L
    h = hull_mask(m)
    assert h[10, 10] and not m[10, 10]  # the corner between the arms is inside the hull
    assert not h[3, 16]  # the far corner outside the hypotenuse is not
    line = np.zeros((10, 10), bool)
    line[5, 2:8] = True
    assert (hull_mask(line) == line).all()
    assert (hull_mask(np.zeros((5, 5), bool)) == 0).all()


def test_mass_on_the_chest_wall_ringed_by_its_halo_is_a_mass_core():
    hu, lungs = chest()
    cy, cx = LEFT_LUNG[0] + LEFT_LUNG[2] - 5, LEFT_LUNG[1]  # on the posterior chest wall, broad-based
    core = disk(cy, cx, 22.0)
    halo = disk(cy, cx, 30.0) & lungs & ~core
    hu[core] = 35.0  # continuous with the chest wall: no fat plane, as the tumour of A0001
    hu[halo] = -480.0
    found = wrapped_cores(hu, halo, [box_of(halo)], PX)
    assert found and is_mass_core(found[0]), found
    c = found[0]
    assert c.area_mm2 >= MASS_CORE_MM2 and c.thick_mm >= MASS_CORE_MM and -50 <= c.mean_hu <= 100
    ccy, ccx = c.rect.center
    assert abs(ccy - (cy - 22.0 / PX / 2)) < 15 / PX and abs(ccx - cx) < 10 / PX  # the core's lung-side half


def test_ground_glass_lining_the_chest_wall_wraps_no_core():
    """A peripheral patch follows the rib cage, which is convex around the lung: its hull holds lung."""
    hu, lungs = chest(1)
    inner = ellipse(LEFT_LUNG[0], LEFT_LUNG[1], LEFT_LUNG[2] - 14 / PX, LEFT_LUNG[3] - 14 / PX)
    angle = np.degrees(np.arctan2(YY - LEFT_LUNG[0], XX - LEFT_LUNG[1]))
    patch = ellipse(*LEFT_LUNG) & ~inner & (angle > 20) & (angle < 110)  # posterolateral band, 14 mm deep
    hu[patch] = -520.0
    assert not [c for c in wrapped_cores(hu, patch, [box_of(patch)], PX) if is_mass_core(c)]


def test_consolidation_the_model_marks_is_not_a_core():
    hu, lungs = chest(2)
    cy, cx = 300.0, 380.0
    cons = disk(cy, cx, 15.0)
    halo = disk(cy, cx, 22.0) & lungs & ~cons
    hu[cons], hu[halo] = 30.0, -480.0
    mask = cons | halo
    assert wrapped_cores(hu, mask, [box_of(mask)], PX) == []


def test_vessels_inside_a_patch_are_opened_away_and_nothing_without_a_mask():
    hu, lungs = chest(3)
    patch = disk(300, 380, 25.0) & lungs
    hu[patch] = -500.0
    ring = patch & ~disk(300, 380, 17.0)  # a ring-shaped mask: its hull holds the patch's middle
    hu[295:297, 340:420] = 40.0  # a 1.4 mm vessel across it
    assert wrapped_cores(hu, ring, [box_of(ring)], PX) == []
    assert wrapped_cores(hu, None, [box_of(ring)], PX) == []
    assert wrapped_cores(hu, ring, [], PX) == []


def test_a_small_core_is_kept_but_is_not_a_mass():
    hu, lungs = chest(4)
    cy, cx = 300.0, 380.0
    core = disk(cy, cx, 7.0)  # a 14 mm solid nodule with its halo: about 150 mm²
    halo = disk(cy, cx, 14.0) & ~core
    hu[core], hu[halo] = 30.0, -480.0
    found = wrapped_cores(hu, halo, [box_of(halo)], PX)
    assert len(found) == 1 and 100 <= found[0].area_mm2 < MASS_CORE_MM2 and not is_mass_core(found[0])


def test_thin_slices_at_other_pixel_sizes_measure_alike():
    """The working grid depends on the pixel size (0.7 mm → 1.4 mm cells, 1 mm → 1 mm): same mass, same core."""
    out = []
    for px in (0.7, 1.0):
        scale = PX / px
        hu, lungs = chest()
        cy, cx = LEFT_LUNG[0] + LEFT_LUNG[2] - 5, LEFT_LUNG[1]
        core = (YY - cy) ** 2 + (XX - cx) ** 2 <= (22.0 / PX * scale) ** 2
        halo = ((YY - cy) ** 2 + (XX - cx) ** 2 <= (30.0 / PX * scale) ** 2) & lungs & ~core
        hu[core], hu[halo] = 35.0, -480.0
        found = wrapped_cores(hu, halo, [box_of(halo)], px)
        out.append(found[0].area_mm2 if found else 0.0)
    assert out[0] > 0 and out[1] == pytest.approx(out[0], rel=0.5), out
