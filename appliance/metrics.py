"""Evaluation metrics, pure numpy: the confusion counts and ratios of Table 3 of Chen et al. 2020, Dice and IoU
of masks, the image score used for the ROC sweep, the area under it, and bootstrap intervals of a mean (how
far a mean Dice over a few images can be trusted; paired, how far two bundles' difference can)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from appliance.domain import Rect
from appliance.imaging import resize

METRIC_KEYS = ("sensitivity", "specificity", "accuracy", "ppv", "npv", "tp", "fp", "tn", "fn")


def ratio(num: int, den: int) -> float | None:
    """num / den, or None when den is 0 (an undefined ratio)."""
    return float(num) / den if den else None


@dataclass
class Confusion:
    """Counts of a binary call against the truth."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, truth: bool, called: bool) -> None:
        if truth:
            self.tp += called
            self.fn += not called
        else:
            self.fp += called
            self.tn += not called

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self, digits: int | None = 4) -> dict:
        """The definitions of Chen et al. 2020: accuracy (TP+TN)/all, sensitivity TP/(TP+FN), specificity TN/(TN+FP),
        PPV TP/(TP+FP), NPV TN/(TN+FN); None where the denominator is 0. Counts included."""
        r = {"sensitivity": ratio(self.tp, self.tp + self.fn), "specificity": ratio(self.tn, self.tn + self.fp),
             "accuracy": ratio(self.tp + self.tn, self.n), "ppv": ratio(self.tp, self.tp + self.fp),
             "npv": ratio(self.tn, self.tn + self.fn)}
        if digits is not None:
            r = {k: (round(v, digits) if v is not None else None) for k, v in r.items()}
        return {**r, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def confusion(truth: Sequence[bool], called: Sequence[bool]) -> Confusion:
    if len(truth) != len(called):
        raise ValueError(f"{len(truth)} truths but {len(called)} calls")
    c = Confusion()
    for t, p in zip(truth, called):
        c.add(bool(t), bool(p))
    return c


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|) of two boolean masks; 1.0 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & truth).sum()) / s


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """|A∩B| / |A∪B| of two boolean masks; 1.0 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    u = int((pred | truth).sum())
    return 1.0 if u == 0 else int((pred & truth).sum()) / u


def predicted_mask(prob: np.ndarray | None, lung: Rect | None, shape: tuple[int, int], threshold: float) -> np.ndarray:
    """The lesion mask in slice pixels: the model-scale probability map resized (bilinear) back to the lung box,
    thresholded, and pasted into a canvas of the slice's shape. Empty when no lung box / no map."""
    out = np.zeros(shape, bool)
    if prob is None or lung is None or lung.height <= 0 or lung.width <= 0:
        return out
    p = resize(np.asarray(prob, np.float32), (lung.height, lung.width))
    out[lung.y0:lung.y1, lung.x0:lung.x1] = p >= threshold
    return out


def _largest_component(mask: np.ndarray) -> int:
    lab, n = ndi.label(mask)  # 4-connected, as the box rule
    return int(np.bincount(lab.ravel())[1:].max()) if n else 0


def component_score(prob: np.ndarray | None, px_area: float, min_area: float) -> float:
    """Per-image score: the highest probability threshold t at which {prob ≥ t} still has a connected component
    whose area (model pixels × px_area, i.e. at 512² scale) exceeds min_area — the area rule of the boxes.

    Components of {prob ≥ t} only grow as t falls, so an image has a qualifying component at threshold t exactly
    when score ≥ t: sweeping t over the scores gives the exact curve. 0.0 when no threshold qualifies.
    """
    if prob is None or prob.size == 0:
        return 0.0
    p = np.asarray(prob, np.float32)
    need = int(np.floor(min_area / px_area)) + 1 if px_area > 0 else p.size + 1  # pixels needed: n·px_area > min
    if need > p.size:
        return 0.0
    values = np.unique(p)
    # the score cannot exceed the need-th largest value; search the distinct values up to it
    cap = np.partition(p.ravel(), p.size - need)[p.size - need]
    values = values[values <= cap]
    lo, hi = 0, len(values) - 1  # values[0] qualifies: all pixels ≥ the minimum form one component
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _largest_component(p >= values[mid]) >= need:
            lo = mid
        else:
            hi = mid - 1
    return float(values[lo])


def sweep(scores: Sequence[float], truth: Sequence[bool]) -> list[dict]:
    """Exact threshold sweep: one point per distinct score (called positive when score ≥ threshold), from the
    strictest (threshold +inf: nothing called) down. Each point: threshold, fpr, tpr and the Table-3 metrics."""
    s = np.asarray(scores, np.float64)
    t = np.asarray(truth, bool)
    points = []
    for th in [np.inf] + sorted(set(s.tolist()), reverse=True):
        c = confusion(t, s >= th)
        m = c.metrics(digits=None)
        points.append({"threshold": float(th), "fpr": None if m["specificity"] is None else 1.0 - m["specificity"],
                       "tpr": m["sensitivity"], **m})
    return points


def auc(points: Sequence[dict]) -> float | None:
    """Area under the ROC curve (trapezoids over the sweep's points); None without both classes."""
    xy = [(p["fpr"], p["tpr"]) for p in points]
    if not xy or any(x is None or y is None for x, y in xy):
        return None
    xs, ys = np.array([x for x, _ in xy]), np.array([y for _, y in xy])
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def mean_or_none(values: Sequence[float], digits: int = 4) -> float | None:
    return round(float(np.mean(values)), digits) if len(values) else None


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 4000,
                      seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (images resampled with replacement, seeded so a
    report is reproducible); None for fewer than 2 values. Paired differences (new − old per image) give the
    interval of a difference between two bundles on the same images."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2:
        return None
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), not {level}")
    rng = np.random.default_rng(seed)
    step = max(1, 2_000_000 // len(v))  # resamples per chunk: memory stays flat however many images
    means = np.concatenate([v[rng.integers(0, len(v), size=(min(step, resamples - k), len(v)))].mean(axis=1)
                            for k in range(0, resamples, step)])
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- the dataset
