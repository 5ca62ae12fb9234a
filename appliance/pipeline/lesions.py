"""Lesion model (UNet++ #2) on the lung-window lung-box crop → probability map → boxes.

Boxes: probability ≥ threshold, connected components, area > min_area_px measured at the manifest's area_scale²
slice scale (512²), in the lung when a lung region is known, quadrant by the lung-box centre. Every value but the
lung test comes from the bundle's typed manifest (Bundle.spec.output).

In the lung: the component's centroid lies in the (dilated) lung region, or at least `MIN_LUNG_SHARE` of its
pixels do. The valid-area region is aerated lung: dense consolidation and diffuse, dependent opacity of a severely
diseased lung lie outside it, and a large such lesion, wrapped around the little aerated lung left, has its centroid
outside too (measured: COVID-19 slices with 24–35 % of the component in the region, TB consolidation 13–60 %).
What the region is there to keep out — lesion-model responses on stomach or bowel gas, the neck — lies apart from
the lung (0–4 % in the region).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from appliance.domain import Box, Rect
from appliance.imaging import resize, window
from appliance.inference.adapter import InferenceAdapter
from appliance.inference.bundle import Bundle, LesionOutput
from appliance.inference.deferred import DeferredAdapter
from appliance.pipeline.anatomy import quadrant_of

MIN_LUNG_SHARE = 0.1  # a component with at least this share of its pixels in the lung region lies in the lung


class LesionDetector:
    def __init__(self, bundle: Bundle, adapter: InferenceAdapter) -> None:
        self.bundle, self.adapter = bundle, adapter
        out: LesionOutput = bundle.output_of(LesionOutput, "lesion")
        self.size = bundle.spec.input.size
        self.window = bundle.spec.input.window
        self.threshold = out.threshold
        self.min_area = out.min_area_px  # at area_scale² slice pixels
        self.area_scale = out.area_scale
        self.min_score = out.min_score
        self.min_crop_mm = out.min_crop_mm  # smallest crop side (DICOM slices)

    def crop_hu(self, hu: np.ndarray, box: Rect) -> np.ndarray:
        return resize(window(hu[box.y0:box.y1, box.x0:box.x1], *self.window), self.size)

    def crop_image(self, img01: np.ndarray) -> np.ndarray:
        return resize(img01.astype(np.float32, copy=False), self.size)

    def infer(self, crops: list[np.ndarray], full_map: bool = True) -> np.ndarray:
        """Probability maps of the crops. full_map=False: only as far as the boxes need (a bundle in two graphs
        skips its second where no box can be made: the same boxes; appliance.inference.deferred)."""
        if not crops:
            return np.zeros((0,) + self.size, np.float32)
        batch = np.stack(crops)[:, None]
        if not full_map and isinstance(self.adapter, DeferredAdapter):
            return self.adapter.infer_for_boxes(batch, self.min_score)[:, 0]
        return self.adapter.infer(batch)[:, 0]

    def boxes(self, prob: np.ndarray, crop: Rect, slice_shape: tuple[int, int], lung_center: tuple[float, float],
              inside: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
              crop_is_slice: bool = False) -> list[Box]:
        """Components of `prob` (model scale) → Boxes in slice pixels.

        inside: which slice points (ys, xs) lie in the lung region (valid_area.LungArea.holds); None: no test.
        """
        mask = prob >= self.threshold
        if not mask.any():
            return []
        lab, n = ndi.label(mask)
        sy, sx = crop.height / self.size[0], crop.width / self.size[1]
        scale = self.area_scale
        to_scale = 1.0 if crop_is_slice else (scale / slice_shape[0]) * (scale / slice_shape[1])
        # per-component size, peak and centre from the mask pixels only (a few hundred, not the 224² map)
        idx = np.flatnonzero(lab)
        labs = lab.ravel()[idx]
        sizes = np.bincount(labs, minlength=n + 1)
        peak = np.zeros(n + 1, np.float32)
        np.maximum.at(peak, labs, prob.ravel()[idx])
        rows, cols = np.divmod(idx, lab.shape[1])
        counts = np.maximum(sizes, 1)
        cys, cxs = np.bincount(labs, rows, n + 1) / counts, np.bincount(labs, cols, n + 1) / counts
        in_lung = np.ones(n + 1, bool)
        if inside is not None:
            hit = inside(crop.y0 + (rows + 0.5) * sy, crop.x0 + (cols + 0.5) * sx)
            share = np.bincount(labs, hit.astype(np.float64), n + 1) / counts
            centre = inside(crop.y0 + (cys + 0.5) * sy, crop.x0 + (cxs + 0.5) * sx)
            in_lung = centre | (share >= MIN_LUNG_SHARE)
        objs = ndi.find_objects(lab)
        out: list[Box] = []
        for i, sl in enumerate(objs, start=1):
            area = sizes[i] * sy * sx * to_scale
            score = float(peak[i])
            if area <= self.min_area or score < self.min_score:
                continue
            if not in_lung[i]:
                continue
            cy, cx = crop.y0 + (cys[i] + 0.5) * sy, crop.x0 + (cxs[i] + 0.5) * sx
            rect = Rect(int(crop.y0 + sl[0].start * sy), int(crop.x0 + sl[1].start * sx),
                        int(np.ceil(crop.y0 + sl[0].stop * sy)), int(np.ceil(crop.x0 + sl[1].stop * sx)))
            out.append(Box(rect, round(float(area), 1), round(score, 4), quadrant_of(cy, cx, *lung_center)))  # type: ignore[arg-type]
        return out
