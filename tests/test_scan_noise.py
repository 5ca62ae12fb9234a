"""models.scan_noise: noise of the asked SD lands inside the scanned field only, and a rewritten series keeps its
geometry (or is enlarged as asked)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from appliance.phantom import PhantomSpec, write_phantom
from models.scan_noise import add_noise, write_noisy
from models.series_rewrite import rewrite_series


def test_noise_has_the_asked_sd_inside_the_field_and_leaves_padding_alone():
    hu = np.full((160, 160), 40.0, np.float32)
    hu[:, :20] = -2048.0  # padding outside the scanned circle
    out = add_noise(hu, 60.0, seed=1)
    added = out - hu
    assert np.array_equal(out[:, :20], hu[:, :20])
    sd = float(added[:, 20:].std())
    assert 50.0 < sd < 70.0
    # correlated over about a pixel: neighbours agree more than white noise would
    inner = added[:, 21:]
    r = np.corrcoef(inner[:, :-1].ravel(), inner[:, 1:].ravel())[0, 1]
    assert 0.3 < r < 0.9
    assert np.array_equal(add_noise(hu, 60.0, seed=1), out)  # seeded: the same every time
    assert np.array_equal(add_noise(hu, 0.0), hu)
    with pytest.raises(ValueError, match="≥ 0 HU"):
        add_noise(hu, -1.0)


def _read(folder):
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: -float(ds.ImagePositionPatient[2]))


def _hu(ds):
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_a_noisy_series_keeps_positions_and_an_enlarged_one_halves_its_pixels(tmp_path):
    src = tmp_path / "src"
    write_phantom(src, PhantomSpec(slices=4, size=96, spacing_mm=2.0, lesion=False, seed=5))
    assert write_noisy(src, tmp_path / "plain", 0.0) == 4
    assert write_noisy(src, tmp_path / "noisy", 80.0) == 4
    assert write_noisy(src, tmp_path / "big", 0.0, enlarge=2) == 4
    before, plain, noisy, big = (_read(tmp_path / d) for d in ("src", "plain", "noisy", "big"))
    z = [float(d.ImagePositionPatient[2]) for d in before]
    assert [float(d.ImagePositionPatient[2]) for d in noisy] == z == [float(d.ImagePositionPatient[2]) for d in big]
    assert all(np.allclose(_hu(a), _hu(b), atol=1.0) for a, b in zip(before, plain))  # 0 HU: as read
    body = _hu(before[1]) > -500
    assert 60.0 < float((_hu(noisy[1]) - _hu(before[1]))[body].std()) < 100.0
    assert big[0].Rows == 2 * before[0].Rows and float(big[0].PixelSpacing[0]) == pytest.approx(1.0)
    assert noisy[0].SeriesDescription == "noise 80 HU" and big[0].SeriesDescription == "noise 0 HU, enlarged 2×"
    with pytest.raises(ValueError, match="whole factor"):
        write_noisy(src, tmp_path / "x", 10.0, enlarge=0)


def test_a_folder_without_ct_slices_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slice")
    with pytest.raises(ValueError, match="no CT slices with a position"):
        rewrite_series(tmp_path, tmp_path / "out", lambda hu, sp, k, n: (hu, sp), "x")
