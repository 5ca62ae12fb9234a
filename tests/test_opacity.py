"""appliance.pipeline.opacity: a box is kept when its lesion pixels are denser than the aerated lung (or dense in
absolute terms), dropped when they are lung of normal density."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.domain import Box, Rect
from appliance.pipeline.opacity import (FLAT_HU, MIN_CONTRAST_HU, aerated_median, is_flat, lesion_median,
                                        opaque_boxes)


def lung_slice(level: float = -860.0, size: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """A slice of soft tissue with a square lung region at `level` HU (with 10 HU of noise)."""
    rng = np.random.default_rng(0)
    hu = np.full((size, size), 40.0, np.float32)
    lung = np.zeros((size, size), bool)
    lung[10:110, 10:110] = True
    hu[lung] = level + rng.normal(0, 10, int(lung.sum()))
    return hu, lung


def box(y0: int, x0: int, y1: int, x1: int) -> Box:
    return Box(Rect(y0, x0, y1, x1), float((y1 - y0) * (x1 - x0)), 0.9, "upper-left")


def test_ground_glass_is_kept_and_normal_lung_between_lucencies_is_dropped():
    hu, lung = lung_slice()
    lesion = np.zeros_like(lung)
    hu[20:40, 20:40] = -600.0  # a ground-glass patch
    lesion[20:40, 20:40] = True
    hu[60:90, 60:90:4] = -975.0  # lucencies: emphysema ...
    lesion[60:90, 60:90] = True  # ... the model marked the region around them
    lesion[60:90, 60:90:4] = False  # (the lucent columns themselves are not marked)
    ggo, flat = box(20, 20, 40, 40), box(60, 60, 90, 90)
    kept, dropped = opaque_boxes(hu, lung, lesion, [ggo, flat])
    assert kept == [ggo] and dropped == 1
    assert lesion_median(hu, lesion, flat) == pytest.approx(-860.0, abs=10)
    assert -880 < aerated_median(hu, lung) < -840  # the lucencies (< −950) are not the reference


def test_faint_ground_glass_on_a_well_aerated_lung_is_an_opacity():
    ref = -870.0
    assert not is_flat(ref + MIN_CONTRAST_HU + 10, ref)  # −785 on −870: faint, but denser than the lung
    assert is_flat(ref + 20, ref)


def test_diffuse_ground_glass_is_kept_although_the_whole_lung_is_as_dense():
    hu, lung = lung_slice(level=-700.0)  # the aerated lung is itself ground glass
    lesion = np.zeros_like(lung)
    lesion[30:60, 30:60] = True
    kept, dropped = opaque_boxes(hu, lung, lesion, [box(30, 30, 60, 60)])
    assert dropped == 0 and len(kept) == 1
    assert is_flat(FLAT_HU - 5, FLAT_HU - 20) and not is_flat(FLAT_HU + 5, FLAT_HU - 20)


def test_without_a_reference_or_a_mask_every_box_is_kept():
    hu, lung = lung_slice()
    b = box(20, 20, 40, 40)
    assert opaque_boxes(hu, lung, None, [b]) == ([b], 0)
    tiny = np.zeros_like(lung)
    tiny[50, 50:60] = True  # 10 lung pixels: no reference
    lesion = np.zeros_like(lung)
    lesion[20:40, 20:40] = True
    assert opaque_boxes(hu, tiny, lesion, [b]) == ([b], 0)
    empty = box(0, 0, 5, 5)  # a box holding no lesion pixel is kept (nothing to measure)
    assert opaque_boxes(hu, lung, lesion, [empty]) == ([empty], 0)
