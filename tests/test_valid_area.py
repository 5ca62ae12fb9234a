"""Valid area: gas below the diaphragm is not lung (the lung region is fixed, not the lesions placed in it)."""
from __future__ import annotations

import numpy as np

from appliance.pipeline.valid_area import GAS_MEAN_HU


def _map(size: int) -> np.ndarray:
    prob = np.zeros((size, size), np.float32)
    prob[20:60, 10:40] = 0.9  # right lung
    prob[20:60, 56:86] = 0.9  # left lung
    prob[70:85, 60:80] = 0.9  # the stomach bubble the model also marked
    return prob


def test_a_gas_component_leaves_the_lung_region_and_the_lung_box(analyzer):
    va = analyzer.valid_area
    size = va.size[0]
    prob = _map(size)
    hu = np.full((size, size), 40.0, np.float32)  # soft tissue
    hu[prob > 0] = -860.0  # aerated lung parenchyma ...
    hu[70:85, 60:80] = -1000.0  # ... and pure gas
    scale = 512 / size
    with_gas = va.postprocess(prob, (512, 512), (0, 0), scale, (0.7, 0.7))
    area = va.postprocess(prob, (512, 512), (0, 0), scale, (0.7, 0.7), hu)
    assert with_gas is not None and area is not None
    assert with_gas.contains(77 * scale, 70 * scale), "without HU the bubble counts as lung"
    assert not area.contains(77 * scale, 70 * scale) and area.contains(40 * scale, 20 * scale)
    assert area.box.y1 < with_gas.box.y1, "the lung box no longer reaches down to the stomach"
    # emphysematous lung (mean well below normal lung, above pure gas) stays lung
    hu[20:60, 10:40] = GAS_MEAN_HU + 25
    assert va.postprocess(prob, (512, 512), (0, 0), scale, (0.7, 0.7), hu).contains(40 * scale, 20 * scale)
