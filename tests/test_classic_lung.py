import numpy as np

from appliance.phantom import PhantomSpec, phantom_series
from appliance.pipeline.classic_lung import lung_mask, mask_box

from .conftest import shared_data


def test_phantom_lungs_found_and_box_holds_them():
    spec = PhantomSpec(slices=10, lesion=False)
    hus = phantom_series(spec)
    mid = lung_mask(hus[5], spec.spacing_mm ** 2)
    assert mid.sum() * spec.spacing_mm ** 2 / 100 > 100  # cm² of lung mid-chest
    y0, x0, y1, x1 = mask_box(mid)
    ys, xs = np.nonzero(mid)
    assert y0 == ys.min() and x1 == xs.max() + 1
    assert not lung_mask(hus[0], spec.spacing_mm ** 2).any()  # above the lungs


def test_gas_pocket_is_not_lung():
    hu = np.full((256, 256), -1000.0, np.float32)
    yy, xx = np.mgrid[:256, :256]
    body = (yy - 128) ** 2 / 110 ** 2 + (xx - 128) ** 2 / 120 ** 2 <= 1
    hu[body] = 40.0
    gas = (yy - 110) ** 2 + (xx - 100) ** 2 <= 30 ** 2  # 28 cm² of pure air at 1 mm²/px
    hu[gas] = -995.0 + np.random.default_rng(0).normal(0, 8, gas.sum())
    lung = (yy - 128) ** 2 + (xx - 180) ** 2 <= 30 ** 2
    hu[lung] = -860.0 + np.random.default_rng(1).normal(0, 40, lung.sum())
    m = lung_mask(hu, 1.0)
    assert m[128, 180] and not m[110, 100]


def test_real_bowel_gas_slice_has_no_lung():
    p = shared_data("covid19-ny-sbu-dicom", "data-sample", "A058062", "axial", "19001231-084.dcm")
    from appliance.ingest.dicom_reader import read_slice

    s = read_slice(p)
    assert not lung_mask(s.hu, s.pixel_spacing[0] * s.pixel_spacing[1]).any()
