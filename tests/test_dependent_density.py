"""models.dependent_density: the dependent band lies where gravity puts it, and a rewritten series keeps its geometry."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from appliance.phantom import PhantomSpec, write_phantom
from models.dependent_density import add_dependent, aerated_lung, write_dependent


def chest(size: int = 200) -> np.ndarray:
    """Air outside, a soft-tissue body, two lungs (−850 HU) either side of the mediastinum."""
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((size, size), -1000.0, np.float32)
    hu[((yy - 100) / 80.0) ** 2 + ((xx - 100) / 95.0) ** 2 <= 1] = 40.0
    for cx in (55, 145):
        hu[((yy - 100) / 60.0) ** 2 + ((xx - cx) / 35.0) ** 2 <= 1] = -850.0
    return hu


def test_the_band_is_posterior_subpleural_and_fades_with_depth():
    hu = chest()
    out = add_dependent(hu, 1.0, 300.0, decay_mm=4.0)
    lung = aerated_lung(hu, 1.0)
    added = out - hu
    assert np.abs(added[~lung]).max() == 0.0  # the chest wall and mediastinum are left alone
    rows = np.flatnonzero(lung.any(axis=1))
    anterior = rows[0] + (rows[-1] - rows[0]) // 2
    assert np.abs(added[:anterior]).max() == 0.0  # nothing in the front half
    col = 55
    lung_rows = np.flatnonzero(lung[:, col])
    pleura = lung_rows[-1]  # the posterior pleura in this column
    near, deeper = added[pleura - 1, col], added[pleura - 12, col]
    assert 120.0 < near <= 330.0 and abs(deeper) < 0.2 * near  # densest at the pleura, faded 12 mm in
    assert added[pleura - 2:pleura, 145].mean() > 100.0  # both lungs


def test_zero_amplitude_and_no_lung_leave_the_slice_alone():
    hu = chest()
    assert np.array_equal(add_dependent(hu, 1.0, 0.0), hu)
    body = np.full((64, 64), 40.0, np.float32)
    assert np.array_equal(add_dependent(body, 1.0, 300.0), body)


def test_a_rewritten_series_keeps_its_positions_and_spacing(tmp_path):
    src = tmp_path / "src"
    write_phantom(src, PhantomSpec(slices=6, size=128, spacing_mm=2.5, lesion=False, seed=3))
    n = write_dependent(src, tmp_path / "out", 300.0, z_from=0.5)
    assert n == 6
    read = lambda d: sorted((pydicom.dcmread(p) for p in d.glob("*.dcm")),  # noqa: E731
                            key=lambda ds: -float(ds.ImagePositionPatient[2]))
    before, after = read(src), read(tmp_path / "out")
    assert [float(d.ImagePositionPatient[2]) for d in before] == [float(d.ImagePositionPatient[2]) for d in after]
    assert all(float(a.PixelSpacing[0]) == 2.5 for a in after)
    hu = lambda ds: ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # noqa: E731
    changed = [not np.allclose(hu(b), hu(a), atol=1.0) for b, a in zip(before, after)]
    assert changed[:3] == [False] * 3 and any(changed[3:])  # the band only from half the series on


def test_a_folder_without_ct_slices_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no slices here")
    with pytest.raises(ValueError, match="no CT slices with a position"):
        write_dependent(tmp_path, tmp_path / "out", 300.0)


def test_the_haze_wraps_vessels_and_the_subpleural_band_only_the_pleura():
    hu = chest()
    yy, xx = np.mgrid[:200, :200]
    vessel = (yy - 140) ** 2 + (xx - 55) ** 2 <= 4  # a vessel cut across in the posterior right lung
    hu[vessel] = 40.0
    ring = ((yy - 140) ** 2 + (xx - 55) ** 2 <= 16) & ~((yy - 140) ** 2 + (xx - 55) ** 2 <= 6)  # 1-2 mm around it
    haze = add_dependent(hu, 1.0, 300.0) - hu
    band = add_dependent(hu, 1.0, 300.0, subpleural=True) - hu
    assert haze[ring].mean() > 100.0 and band[ring].mean() < 20.0  # only the haze wraps the vessel
    col = np.flatnonzero(aerated_lung(hu, 1.0)[:, 55])[-1]  # the posterior pleura in that column
    assert band[col - 1, 55] > 120.0  # both are densest at the pleura
    assert haze[col - 1, 55] > 120.0
