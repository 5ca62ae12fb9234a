"""Lesion boxes (appliance/pipeline/lesions.py): which components of the lesion map lie in the lung."""
from __future__ import annotations

import numpy as np

from appliance.domain import Rect
from appliance.pipeline.lesions import MIN_LUNG_SHARE
from appliance.pipeline.valid_area import LungArea

from .conftest import shared_data

SLICE = (448, 448)  # the lesion model's 224² map covers the whole slice: 2 slice pixels per map pixel


def _area() -> LungArea:
    """Aerated lung left only anteriorly on the image-left side (96² model grid, region dilated by 3)."""
    lung = np.zeros((96, 96), bool)
    lung[10:30, 10:40] = True
    return LungArea(Rect(40, 40, 160, 200), lung, (0, 0), SLICE[0] / 96, dilate=3)


def _prob(*blocks: tuple[int, int, int, int]) -> np.ndarray:
    prob = np.zeros((224, 224), np.float32)
    for y0, x0, y1, x1 in blocks:  # slice pixels
        prob[y0 // 2:y1 // 2, x0 // 2:x1 // 2] = 0.95
    return prob


def _share(area: LungArea, y0: int, x0: int, y1: int, x1: int) -> float:
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return float(area.holds(ys.ravel() + 0.5, xs.ravel() + 0.5).mean())


def test_a_lesion_wrapped_around_the_little_aerated_lung_left_is_in_the_lung(analyzer):
    area = _area()
    wrapped = (120, 40, 330, 200)  # dense, dependent: below the aerated strip, centroid well outside the region
    inner = (50, 60, 80, 100)  # in the aerated lung
    gas = (380, 300, 430, 360)  # far from the lung: stomach gas the model responded to
    for b in (wrapped, inner, gas):
        assert _share(area, *b) < 1.0 or b is inner
    assert not area.contains((wrapped[0] + wrapped[2]) / 2, (wrapped[1] + wrapped[3]) / 2)
    assert MIN_LUNG_SHARE <= _share(area, *wrapped) <= 0.3 and _share(area, *gas) == 0.0
    det = analyzer.lesion
    boxes = det.boxes(_prob(wrapped, inner, gas), Rect(0, 0, *SLICE), SLICE, area.box.center, inside=area.holds)
    got = sorted((b.rect.y0, b.rect.x0) for b in boxes)
    assert got == [(50, 60), (120, 40)], got  # the wrapped lesion kept, the gas response not
    everything = det.boxes(_prob(wrapped, inner, gas), Rect(0, 0, *SLICE), SLICE, area.box.center)
    assert len(everything) == 3  # without a lung region nothing is dropped


def test_a_component_only_grazing_the_lung_region_stays_out(analyzer):
    area = _area()
    grazing = (100, 185, 250, 320)  # overlaps the dilated region along one edge: a few % of its pixels
    share = _share(area, *grazing)
    assert 0.0 < share < MIN_LUNG_SHARE, share
    boxes = analyzer.lesion.boxes(_prob(grazing), Rect(0, 0, *SLICE), SLICE, area.box.center, inside=area.holds)
    assert boxes == []


def test_holds_is_contains_for_many_points():
    area = _area()
    rng = np.random.default_rng(0)
    ys, xs = rng.uniform(-20, 470, 500), rng.uniform(-20, 470, 500)
    assert list(area.holds(ys, xs)) == [area.contains(y, x) for y, x in zip(ys, xs)]
    assert area.holds(ys, xs).any() and not area.holds(ys, xs).all()


def test_real_severe_covid_slice_keeps_the_dependent_opacity_of_both_lungs(analyzer):
    """NY-SBU A046441 (COVID-19): diffuse dense opacity fills the patient's right lung around a little aerated
    lung anteriorly; the valid-area region holds only that. Its lesion component (≈ 17,000 px at 512²) used
    to be dropped: its centroid lies outside the region."""
    from appliance.ingest.dicom_reader import read_slice

    f = shared_data("covid19-ny-sbu-dicom", "data-sample", "A046441", "axial", "19010101-23.dcm")
    s = read_slice(f, 10.0)
    (found,) = analyzer.findings([s])
    mid = s.shape[1] / 2
    right = [b for b in found.boxes if (b.rect.x0 + b.rect.x1) / 2 < mid]  # image left: the patient's right
    left = [b for b in found.boxes if (b.rect.x0 + b.rect.x1) / 2 >= mid]
    assert left and right, found.boxes
    assert max(b.area_512 for b in right) > 5000, right
