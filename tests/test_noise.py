"""Noise at the lesion model's input: the estimate, smoothing to a target, the series' acquisition note."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from appliance.pipeline.noise import MIN_PIXELS, NOISY, acquisition, crop_noise, smooth_to


def _crop(sd: float, blur: float = 0.0, seed: int = 0) -> np.ndarray:
    """A lung-window crop: parenchyma (0.3) with a soft-tissue border (0.9), plus noise of SD `sd`."""
    rng = np.random.default_rng(seed)
    a = np.full((224, 224), 0.9, np.float32)
    a[20:204, 20:204] = 0.3
    n = rng.standard_normal(a.shape).astype(np.float32)
    if blur:
        n = ndi.gaussian_filter(n, blur)
        n /= n.std()
    return (a + n * sd).astype(np.float32)


@pytest.mark.parametrize("sd", [0.005, 0.01, 0.02, 0.04])
def test_white_noise_is_measured_at_its_sd(sd):
    assert crop_noise(_crop(sd)) == pytest.approx(sd, rel=0.08)


def test_correlated_noise_reads_lower_and_the_soft_tissue_border_is_left_out():
    assert crop_noise(_crop(0.02, blur=1.0)) < 0.5 * crop_noise(_crop(0.02))
    clean = _crop(0.0)
    assert crop_noise(clean) == 0.0  # the parenchyma/soft-tissue edge is not counted as noise


def test_no_estimate_without_parenchyma_and_a_clear_error_for_a_bad_crop():
    soft = np.full((224, 224), 0.9, np.float32)
    assert crop_noise(soft) is None
    few = soft.copy()
    few[:10, :10] = 0.3  # fewer parenchyma pixels than MIN_PIXELS
    assert 100 < MIN_PIXELS and crop_noise(few) is None
    with pytest.raises(ValueError, match="2-D"):
        crop_noise(np.zeros((2, 224, 224), np.float32))


def test_smooth_to_reaches_the_target_with_the_least_smoothing_and_leaves_clean_crops_alone():
    noisy = _crop(0.03)
    out, sigma = smooth_to(noisy, 0.010)
    assert sigma > 0 and crop_noise(out) <= 0.010 and out.dtype == np.float32 and out.shape == noisy.shape
    milder, s2 = smooth_to(noisy, 0.020)
    assert 0 < s2 < sigma and crop_noise(milder) <= 0.020
    assert abs(float(out[100:120, 100:120].mean()) - 0.3) < 0.01  # the parenchyma's level is kept
    clean = _crop(0.005)
    same, s0 = smooth_to(clean, 0.010)
    assert s0 == 0.0 and same is clean
    no_lung = np.full((224, 224), 0.9, np.float32)
    assert smooth_to(no_lung, 0.010) == (no_lung, 0.0)


def test_acquisition_is_the_median_of_measured_slices_and_flags_a_noisy_series():
    a = acquisition([0.006, None, 0.008, 0.030], smoothed=1, flat_boxes=4)
    assert a == {"noise": 0.008, "noisy": False, "limit": NOISY, "smoothed_slices": 1, "slices_measured": 3,
                 "flat_boxes": 4}
    b = acquisition([0.02, 0.021, None], limit=0.016)
    assert b["noisy"] is True and b["noise"] == pytest.approx(0.0205)
    assert acquisition([None, None]) is None and acquisition([]) is None


def _series(sd_hu: float, slices: int = 24):
    """A normal phantom chest (no lesion) with sharp-kernel-like noise of `sd_hu` added in HU."""
    from appliance.domain import SliceImage
    from appliance.phantom import PhantomSpec, phantom_series

    rng = np.random.default_rng(1)
    out = []
    for k, hu in enumerate(phantom_series(PhantomSpec(slices=slices, lesion=False))):
        if sd_hu:
            n = ndi.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 0.6)
            hu = (hu + n / n.std() * sd_hu).astype(np.float32)
        out.append(SliceImage(key=f"s{k:03d}", series_uid="1.2.3", study_uid="1.2", position=5.0 * k, hu=hu,
                              pixel_spacing=(0.7, 0.7), thickness=5.0))
    return out


def test_a_noisy_normal_series_is_smoothed_reported_and_stays_negative(analyzer):
    """Noise like a sharp lung kernel at low dose: the verdict says so, the crops are smoothed before the lesion
    model, and the normal chest is not called positive on its noise."""
    import dataclasses

    from appliance.pipeline.analyzer import Analyzer

    plain = Analyzer(analyzer.lesion, analyzer.valid_area, dataclasses.replace(analyzer.config, denoise=False))
    clean = _series(0.0)
    v, _ = analyzer.verdict(clean, analyzer.findings(clean))
    assert v.result == "negative" and v.acquisition["noisy"] is False and v.acquisition["smoothed_slices"] == 0
    assert v.acquisition["noise"] < 0.010

    noisy = _series(75.0)
    f_on = analyzer.findings(noisy)
    v_on, _ = analyzer.verdict(noisy, f_on)
    f_off = plain.findings(noisy)
    v_off, _ = plain.verdict(noisy, f_off)
    assert v_on.acquisition["noisy"] is True and v_off.acquisition["noisy"] is True
    assert v_on.acquisition["noise"] > NOISY and v_on.acquisition["noise"] == v_off.acquisition["noise"]
    assert v_on.acquisition["smoothed_slices"] == v_on.acquisition["slices_measured"] > 10
    assert v_off.acquisition["smoothed_slices"] == 0
    assert all(f.smoothed > 0 for f in f_on if f.noise is not None)
    assert v_on.result == "negative"
    assert sum(f.has_lesion for f in f_on) <= sum(f.has_lesion for f in f_off)
