import numpy as np

from appliance.pipeline.crop_window import CANON_LUNG, CANON_SOFT, landmarks, standardise


def fake_crop(lung_grey: float, soft_grey: float, seed: int = 0) -> np.ndarray:
    """Half parenchyma, half soft tissue, some noise: a crop exported with some display window."""
    rng = np.random.default_rng(seed)
    a = np.empty((100, 120), np.float32)
    a[:, :60] = lung_grey
    a[:, 60:] = soft_grey
    return np.clip((a + rng.normal(0, 3, a.shape)) / 255.0, 0, 1).astype(np.float32)


def test_landmarks_found_and_mapped_to_canonical():
    crops = [fake_crop(20, 245, s) for s in range(3)]
    lung, soft = landmarks(crops)
    assert abs(lung - 20) <= 2 and abs(soft - 245) <= 2
    out = standardise(crops, (lung, soft))
    assert abs(np.median(out[0][:, :60]) * 255 - CANON_LUNG) < 3
    assert abs(np.median(out[0][:, 60:]) * 255 - CANON_SOFT) < 3


def test_canonical_series_is_left_alone():
    crops = [fake_crop(CANON_LUNG, CANON_SOFT, 1)]
    out = standardise(crops, landmarks(crops))
    assert np.abs(out[0] - crops[0]).max() < 0.02


def test_implausible_landmarks_mean_identity():
    flat = [np.full((50, 50), 0.5, np.float32)]
    assert landmarks(flat) is None
    assert standardise(flat, None)[0] is flat[0]
