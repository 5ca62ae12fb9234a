"""models.expiration: the aerated lung becomes denser by the factor asked; soft tissue, padding and geometry stay."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from appliance.phantom import PhantomSpec, write_phantom
from models.expiration import expire, write_expiration


def test_aerated_lung_is_scaled_towards_water_and_the_rest_left_alone():
    hu = np.array([[-850.0, -900.0, -450.0, 40.0, -2048.0]], np.float32)
    out = expire(hu, 1.8)
    assert out[0, 0] == pytest.approx(-730.0) and out[0, 1] == pytest.approx(-820.0)  # −1000 + 150 × 1.8, 100 × 1.8
    assert out[0, 2:].tolist() == [-450.0, 40.0, -2048.0]  # soft tissue, fat-lung border and padding stay
    edge = expire(np.array([[-520.0]], np.float32), 1.8)[0, 0]  # 20 HU below the border: mostly left as it was
    assert -520.0 <= edge <= -500.0
    assert np.array_equal(expire(hu, 1.0), hu)
    with pytest.raises(ValueError, match="between 1 and 2"):
        expire(hu, 2.5)


def test_a_series_in_expiration_keeps_its_geometry_and_is_denser(tmp_path):
    src = tmp_path / "src"
    write_phantom(src, PhantomSpec(slices=4, size=96, spacing_mm=2.0, lesion=False, seed=4))
    assert write_expiration(src, tmp_path / "exp", 1.6) == 4
    read = lambda d: sorted((pydicom.dcmread(p) for p in d.glob("*.dcm")),  # noqa: E731
                            key=lambda ds: -float(ds.ImagePositionPatient[2]))
    before, after = read(src), read(tmp_path / "exp")
    hu = lambda ds: ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # noqa: E731
    lung = (hu(before[2]) < -700) & (hu(before[2]) > -1000)
    assert lung.any() and float(np.median(hu(after[2])[lung] - hu(before[2])[lung])) > 50.0
    assert [float(d.ImagePositionPatient[2]) for d in after] == [float(d.ImagePositionPatient[2]) for d in before]
    assert after[0].SeriesDescription == "expiration ×1.6"
