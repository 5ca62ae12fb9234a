"""Valid area (UNet++ #1): full slice → lung mask → lung box, or None when the slice shows no lung."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage as ndi

from appliance.domain import Rect
from appliance.imaging import resize, window
from appliance.inference.adapter import InferenceAdapter
from appliance.inference.bundle import Bundle, ValidAreaOutput


@dataclass
class LungArea:
    """Lung box in slice pixels plus the low-resolution lung region used to keep lesions inside the lung."""

    box: Rect
    lung: np.ndarray  # bool, model resolution, square-padded frame: the lung components kept
    offset: tuple[int, int]  # (oy, ox) padding added to make the slice square
    scale: float  # slice pixels per model pixel
    dilate: int = 3  # model pixels the lung is grown by for `region`

    @cached_property
    def region(self) -> np.ndarray:
        """The lung dilated and hole-filled (model resolution); computed on first use: most slices have no lesion
        to place, so most never need it."""
        return ndi.binary_fill_holes(ndi.binary_dilation(self.lung, iterations=self.dilate))

    def contains(self, y: float, x: float) -> bool:
        """Is the slice point (y, x) inside the (dilated) lung region?"""
        return bool(self.holds(np.array([y]), np.array([x]))[0])

    def holds(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Which slice points (ys, xs) lie inside the (dilated) lung region: `contains` for many points."""
        r = np.floor((np.asarray(ys, np.float64) + self.offset[0]) / self.scale).astype(np.int64)
        c = np.floor((np.asarray(xs, np.float64) + self.offset[1]) / self.scale).astype(np.int64)
        h, w = self.region.shape
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out = np.zeros(r.shape, bool)
        out[ok] = self.region[r[ok], c[ok]]
        return out


def square_pad(hu: np.ndarray, fill: float = -1024.0) -> tuple[np.ndarray, tuple[int, int]]:
    r, c = hu.shape
    if r == c:
        return hu, (0, 0)
    n = max(r, c)
    out = np.full((n, n), fill, np.float32)
    oy, ox = (n - r) // 2, (n - c) // 2
    out[oy:oy + r, ox:ox + c] = hu
    return out, (oy, ox)


GAS_MEAN_HU = -970.0  # a mask component this dark on average is gas (stomach, bowel), not lung: lung parenchyma,
# a mix of air, vessels and tissue, averages near −860 HU, and even severe emphysema stays above about −950 HU


class ValidArea:
    """Preprocess → infer → postprocess for the lung valid-area model."""

    def __init__(self, bundle: Bundle, adapter: InferenceAdapter) -> None:
        self.bundle, self.adapter = bundle, adapter
        out: ValidAreaOutput = bundle.output_of(ValidAreaOutput, "valid-area")
        self.size = bundle.spec.input.size
        self.window = bundle.spec.input.window
        self.threshold = out.threshold
        self.min_lung_cm2 = out.min_lung_cm2  # per component
        self.min_total_cm2 = out.min_total_lung_cm2  # for the slice to count as lung
        self.margin = out.box_margin
        self.region_dilate = out.region_dilate_px

    def preprocess(self, hu: np.ndarray) -> tuple[np.ndarray, tuple[int, int], float, np.ndarray]:
        """(model input, padding offset, slice pixels per model pixel, the padded HU at model size)."""
        sq, off = square_pad(hu)
        x = resize(window(sq, *self.window), self.size)
        return x, off, sq.shape[0] / self.size[0], resize(sq.astype(np.float32, copy=False), self.size)

    def postprocess(self, prob: np.ndarray, shape: tuple[int, int], offset: tuple[int, int], scale: float,
                    spacing: tuple[float, float], hu_small: np.ndarray | None = None) -> LungArea | None:
        """The lung area from the model's map; hu_small: the square-padded slice's HU at model size, to leave
        out components that are gas (stomach or bowel below the diaphragm), not lung."""
        mask = prob >= self.threshold
        lab, n = ndi.label(mask)
        if n == 0:
            return None
        sizes = np.bincount(lab.ravel())[1:]
        px_cm2 = spacing[0] * spacing[1] * scale * scale / 100.0
        big = sizes * px_cm2 >= self.min_lung_cm2
        if hu_small is not None:
            mean = np.bincount(lab.ravel(), weights=hu_small.ravel(), minlength=n + 1)[1:] / np.maximum(sizes, 1)
            big &= mean >= GAS_MEAN_HU
        keep = np.flatnonzero(big) + 1
        if keep.size == 0 or sizes[keep - 1].sum() * px_cm2 < self.min_total_cm2:
            return None  # no lung, or only a sliver at the apex/base (often the trachea or bowel gas)
        lung = np.isin(lab, keep)
        rows = np.flatnonzero(lung.any(1))
        cols = np.flatnonzero(lung.any(0))
        y0, y1 = rows[0] * scale - offset[0], (rows[-1] + 1) * scale - offset[0]
        x0, x1 = cols[0] * scale - offset[1], (cols[-1] + 1) * scale - offset[1]
        dy, dx = (y1 - y0) * self.margin, (x1 - x0) * self.margin
        h, w = shape
        box = Rect(max(0, int(y0 - dy)), max(0, int(x0 - dx)), min(h, int(np.ceil(y1 + dy))), min(w, int(np.ceil(x1 + dx))))
        if box.height < 8 or box.width < 8:
            return None
        return LungArea(box, lung, offset, scale, self.region_dilate)

    def __call__(self, hus: list[np.ndarray], spacings: list[tuple[float, float]]) -> list[LungArea | None]:
        if not hus:
            return []
        pre = [self.preprocess(h) for h in hus]
        batch = np.stack([p[0] for p in pre])[:, None]
        prob = self.adapter.infer(batch)[:, 0]
        return [self.postprocess(prob[i], hus[i].shape, pre[i][1], pre[i][2], spacings[i], pre[i][3])
                for i in range(len(hus))]
