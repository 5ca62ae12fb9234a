import numpy as np
import pytest
from pylibjpeg import decode

from appliance.jpeg_lossless import encode


@pytest.mark.parametrize("shape,precision,hi", [((64, 80), 12, 4096), ((17, 19), 16, 65536), ((8, 8), 8, 256)])
def test_round_trip_through_libjpeg(shape, precision, hi):
    a = np.random.default_rng(1).integers(0, hi, shape).astype(np.uint16)
    np.testing.assert_array_equal(decode(encode(a, precision)).astype(np.int64), a)


def test_flat_image_and_marker_stuffing():
    a = np.full((40, 40), 4095, np.uint16)
    a[::3, ::5] = 0  # large jumps make 0xFF bytes in the entropy-coded data
    np.testing.assert_array_equal(decode(encode(a, 12)), a)


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        encode(np.full((4, 4), 5000, np.uint16), precision=12)
