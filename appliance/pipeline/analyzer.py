"""Composes the stages for a batch of slices: valid area → lesion crop → lesion model → boxes → case rule."""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from appliance.config import AnalysisConfig
from appliance.domain import Rect, SeriesVerdict, SliceFinding, SliceImage
from appliance.inference.bundle import Bundle, BundleError, default_bundle_dir, find_bundles
from appliance.ingest.series import sort_key
from appliance.pipeline.case_logic import CaseRule, decide
from appliance.pipeline.grading import lesion_at_slice, lung_at_slice, measure_slice
from appliance.pipeline.halo_core import wrapped_cores
from appliance.pipeline.lesions import LesionDetector
from appliance.pipeline.noise import crop_noise, smooth_to
from appliance.pipeline.opacity import opaque_boxes
from appliance.pipeline.solid import solid_components
from appliance.pipeline.valid_area import ValidArea

STAGES = ("valid_area", "lesion_pre", "lesion_infer", "boxes", "measures")  # measures: solids, halo cores, grading
T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items on `workers` threads, results in input order; at most workers + 1 items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="analyse") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class Analyzer:
    def __init__(self, lesion: LesionDetector, valid_area: ValidArea | None, config: AnalysisConfig | None = None) -> None:
        self.lesion, self.valid_area = lesion, valid_area
        self.config = config or AnalysisConfig()
        self.rule = CaseRule.from_config(self.config)  # the case rule every caller of this analyzer shares

    @classmethod
    def load(cls, config: AnalysisConfig | None = None, bundle_dir: Path | None = None) -> "Analyzer":
        """Load the newest `valid-area` and `lesion` bundles (default: the shipped ones) on the configured backend."""
        config = config or AnalysisConfig()
        backend, precision, threads = config.backend, config.precision, config.threads or None
        streams = config.workers or None
        root = Path(bundle_dir or config.bundle_dir or default_bundle_dir())
        found = find_bundles(root)
        missing = [n for n in ("valid-area", "lesion") if n not in found]
        if missing:
            raise BundleError(f"no {' or '.join(missing)} bundle under {root}")
        bundles: dict[str, Bundle] = {}
        for name in ("valid-area", "lesion"):
            found[name].verify_files()
            bundles[name] = found[name]
        va = ValidArea(bundles["valid-area"], bundles["valid-area"].adapter(backend, precision, threads, streams))
        le = LesionDetector(bundles["lesion"], bundles["lesion"].adapter(backend, precision, threads, streams))
        return cls(le, va, config)

    @property
    def bundles(self) -> list[dict[str, str]]:
        out = [self.valid_area.bundle.ref()] if self.valid_area else []
        return out + [self.lesion.bundle.ref()]

    @property
    def backend(self) -> str:
        return self.lesion.adapter.backend

    @property
    def device(self) -> str:
        return self.lesion.adapter.device

    @property
    def precision(self) -> str:
        return self.lesion.adapter.precision

    @property
    def workers(self) -> int:
        """Batches analysed at once: one per inference stream of the models."""
        adapters = [self.lesion.adapter] + ([self.valid_area.adapter] if self.valid_area else [])
        return max(1, min(int(getattr(a, "streams", 1)) for a in adapters))

    def chunks(self, items: Sequence[T]) -> list[Sequence[T]]:
        """Batches of at most `config.batch`, small enough that every worker gets one."""
        if not items:
            return []
        size = max(1, min(self.config.batch, math.ceil(len(items) / self.workers)))
        return [items[i:i + size] for i in range(0, len(items), size)]

    def map(self, fn: Callable[[T], R], chunks: Iterable[T]) -> Iterator[R]:
        """fn over chunks on this analyzer's workers, results in order."""
        return ordered_map(fn, chunks, self.workers)

    def findings(self, slices: Sequence[SliceImage], keep_prob: bool = False) -> list[SliceFinding]:
        """Analyse slices (any order) in batches, `workers` batches at once; results in the same order as given.

        keep_prob: keep each slice's lesion probability map (model scale, over the lung box) for Dice. It is then the
        full map on every slice; without it a lesion bundle in two graphs runs its second only where a box can still
        be made (the same boxes: appliance/inference/deferred.py).
        """
        out: list[SliceFinding] = []
        for fs in self.map(lambda c: self.batch(c, keep_prob), self.chunks(slices)):
            out.extend(fs)
        return out

    def batch(self, slices: Sequence[SliceImage], keep_prob: bool = False) -> list[SliceFinding]:
        """One batch through every stage on the calling thread (`findings` spreads batches over the workers)."""
        n = len(slices)
        t = {k: 0.0 for k in STAGES}
        t0 = time.perf_counter()
        hu_idx = [i for i, s in enumerate(slices) if s.hu is not None]
        areas = [None] * n
        if hu_idx and self.valid_area is not None:
            res = self.valid_area([slices[i].hu for i in hu_idx], [slices[i].pixel_spacing for i in hu_idx])  # type: ignore[misc]
            for i, a in zip(hu_idx, res):
                areas[i] = a
            t["valid_area"] = time.perf_counter() - t0  # stays 0 for crop images: the stage does not run
        t1 = time.perf_counter()
        crops, which, rects, crop_rects = [], [], [], []
        noise: dict[int, tuple[float | None, float]] = {}  # slice -> (noise at input, smoothing sigma)
        for i, s in enumerate(slices):
            if s.hu is not None:
                if areas[i] is None:
                    continue
                rect = areas[i].box  # type: ignore[union-attr]
                crop = min_crop(rect, s.shape, s.pixel_spacing, self.lesion.min_crop_mm)
                c = self.lesion.crop_hu(s.hu, crop)
                level = crop_noise(c)
                sigma = 0.0
                if self.config.denoise:
                    c, sigma = smooth_to(c, self.config.noise_target, level)
                noise[i] = (level, sigma)
                crops.append(c)
            else:
                h, w = s.shape
                rect = crop = Rect(0, 0, h, w)
                crops.append(self.lesion.crop_image(s.window01))  # type: ignore[arg-type]
            which.append(i)
            rects.append(rect)
            crop_rects.append(crop)
        t2 = time.perf_counter()
        t["lesion_pre"] = t2 - t1
        probs = self.lesion.infer(crops, full_map=keep_prob)
        t3 = time.perf_counter()
        t["lesion_infer"] = t3 - t2
        found: dict[int, SliceFinding] = {}
        t["measures"] = 0.0  # solid components and grading counts (HU slices)
        for j, i in enumerate(which):
            s, rect, crop, prob = slices[i], rects[j], crop_rects[j], probs[j]
            area = areas[i]
            boxes = self.lesion.boxes(prob, crop, s.shape, rect.center,
                                      inside=area.holds if area is not None else None,
                                      crop_is_slice=s.hu is None)
            frac = float((prob >= self.lesion.threshold).mean())
            found[i] = SliceFinding(s.key, s.position, s.shape, rect, boxes, float(prob.max()), frac,
                                    prob=prob.astype(np.float16) if keep_prob else None,
                                    crop=crop if crop != rect else None)
            if i in noise:
                found[i].noise, found[i].smoothed = noise[i]
            if s.hu is not None:
                found[i].pixel_mm = round(math.sqrt(s.pixel_spacing[0] * s.pixel_spacing[1]), 4)
                found[i].patient_position = s.patient_position
            if s.hu is not None and area is not None:
                tm = time.perf_counter()
                lung = lung_at_slice(area.lung, area.offset, area.scale, s.shape)
                lesion = lesion_at_slice(prob, self.lesion.threshold, crop, [b.rect for b in boxes], s.shape)
                if self.config.density_check and boxes:
                    kept, flat = opaque_boxes(s.hu, lung, lesion, boxes)
                    if flat:  # boxes on lung of normal density: texture, not an opacity
                        boxes = found[i].boxes = kept
                        found[i].flat_boxes = flat
                        lesion = lesion_at_slice(prob, self.lesion.threshold, crop, [b.rect for b in boxes], s.shape)
                found[i].solids = solid_components(s.hu, rect, s.pixel_spacing, lung)
                found[i].cores = wrapped_cores(s.hu, lesion, [b.rect for b in boxes], s.pixel_spacing)
                found[i].measures = measure_slice(s.hu, lung, lesion, s.pixel_spacing)
                t["measures"] += time.perf_counter() - tm
        t["boxes"] = time.perf_counter() - t3 - t["measures"]
        per = {k: round(v * 1000.0 / n, 3) for k, v in t.items()}
        out = []
        for i, s in enumerate(slices):
            f = found.get(i) or SliceFinding(s.key, s.position, s.shape, None)
            f.timings_ms = per
            out.append(f)
        return out

    def verdict(self, slices: Sequence[SliceImage], findings: Sequence[SliceFinding], final: bool = True,
                rule: CaseRule | None = None) -> tuple[SeriesVerdict, list[SliceFinding]]:
        """Sort (slices, findings) into series order and apply the case rule (default: this analyzer's)."""
        order = sorted(range(len(slices)), key=lambda i: sort_key(slices[i]))
        ordered = [findings[i] for i in order]
        rule = rule or self.rule
        dicom = all(s.window01 is None for s in slices)
        return decide(ordered, rule if dicom else rule.for_images(), final=final), ordered


def min_crop(box: Rect, shape: tuple[int, int], spacing: tuple[float, float], min_mm: float) -> Rect:
    """The lung box grown about its centre to at least `min_mm` per side (within the slice), so that a small box
    (apex, base) is not magnified far beyond what the lesion model learned on whole-lung crops."""
    if min_mm <= 0:
        return box
    h, w = shape
    need_h = min(h, int(np.ceil(min_mm / max(spacing[0], 1e-3))))
    need_w = min(w, int(np.ceil(min_mm / max(spacing[1], 1e-3))))
    if box.height >= need_h and box.width >= need_w:
        return box

    def grow(lo: int, hi: int, need: int, size: int) -> tuple[int, int]:
        if hi - lo >= need:
            return lo, hi
        lo = int(round((lo + hi - need) / 2))
        lo = min(max(0, lo), size - need)
        return lo, lo + need

    y0, y1 = grow(box.y0, box.y1, need_h, h)
    x0, x1 = grow(box.x0, box.x1, need_w, w)
    return Rect(y0, x0, y1, x1)


def stage_summary(findings: Sequence[SliceFinding]) -> dict[str, float]:
    """Mean ms per slice and stage over findings."""
    if not findings:
        return {k: 0.0 for k in STAGES}
    return {k: round(float(np.mean([f.timings_ms.get(k, 0.0) for f in findings])), 3) for k in STAGES}
