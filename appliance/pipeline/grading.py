"""Per-slice lesion measurements and the study grade, pure numpy + scipy.

`measure_slice` counts, on one slice, lung and lesion pixels per patient side, lesion pixels by density (ground
glass vs consolidation) and by distribution (peripheral vs central). `grade` turns a series of them into:

- an RSNA-style category (Simpson et al., Radiology: Cardiothoracic Imaging 2020): typical / indeterminate /
  atypical (negative: no lesion), with the reasons as short phrases ("bilateral", "peripheral 81 %",
  "ground glass 78 %", "multifocal (5 foci)");
- the extent: % of each lung involved, and per zone (upper/middle/lower third of the lung's z-range × side);
- a 25-point severity score (Pan et al. 2020 style): 5 regions — right upper, right middle, right lower, left
  upper, left lower — each 0–5 by % involved (0 none, 1 < 5 %, 2 5–25 %, 3 26–49 %, 4 50–75 %, 5 > 75 %);
- the share of lesion in the posterior (dependent, supine) third of each lung. A mild pattern (< `DEPENDENT_MAX_PCT`
  of the lungs) that is mostly posterior (≥ `DEPENDENT_SHARE`) gets a reason that says prone images would tell it
  from dependent density (gravity-dependent atelectasis, common on normal supine scans, which the lesion model reads
  as ground glass: models/LESION2.md). It changes no category: early COVID-19 is posterior too (P001: 82 %).

What it is and is not: a grade of the *viral pneumonia pattern*. Other viral pneumonias (influenza, RSV,
adenovirus), organising pneumonia, drug reactions and some bacterial (atypical) pneumonias share the "typical"
pattern; imaging does not tell them from COVID-19 and this grade does not try. Regions are approximated from
thirds of the lung's z-range (zones), not segmented lobes: the fissures are oblique, so the lower lobes reach
far up posteriorly and "right middle" here is the right middle zone, not the middle lobe. Peripheral means the
outer third of the lung from the chest wall, measured with a distance transform from the thoracic envelope
(both lungs' convex hull), so the mediastinal surface and the hila count as central.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from appliance.domain import Rect, SliceMeasures  # noqa: F401 - SliceMeasures: the per-slice counts
from appliance.imaging import resize
from appliance.geometry import median_spacing
from appliance.pipeline.solid import block_mean, fill_holes, midline, morph
from appliance.pipeline.solid_lesions import SolidLesion

GGO_HU = (-750.0, -300.0)  # ground glass: hazy, vessels still visible through it
CONSOLIDATION_HU = (-300.0, 100.0)  # consolidation: vessels obscured (above ~+100: calcium, contrast, bone)
GAS_MEAN_HU = -950.0  # a lung-mask component this dark on average is gas, not parenchyma
WORK_MM = 2.5  # measured on the slice reduced by the largest integer factor keeping pixels ≤ this (mm)
PERIPHERAL_THIRD = 1.0 / 3.0  # peripheral: within this share of the chest-wall-to-hilum depth
MIN_LESION_ML = 0.1  # less lesion than this (a 6 mm sphere) in the whole series: no lesion (negative)
SIDE_MIN_ML = 1.0  # a side is involved with at least this ...
SIDE_MIN_SHARE = 0.1  # ... and this share of the lesion volume (a stray box on one slice is not a side)
PREDOMINANT = 0.6  # a density or distribution that holds ≥ this share predominates
NODULAR_ML = 4.2  # mean lesion volume per focus below this (a 2 cm sphere), consolidation-predominant: nodular
POSTERIOR_THIRD = 1.0 / 3.0  # posterior: within this share of the side's lung height from its back
DEPENDENT_SHARE = 0.75  # a positive with at least this share of its lesion in the posterior thirds ...
DEPENDENT_MAX_PCT = 5.0  # ... and less than this % of the lungs involved gets the prone-images advice
DEPENDENT_ADVICE = "dependent density looks alike: prone images tell them apart"  # the reason's detail
REGIONS = ("RUL", "RML", "RLL", "LUL", "LLL")
ZONES = ("upper", "middle", "lower")


def _factor(spacing_mm: float) -> int:
    return max(1, int(WORK_MM / max(spacing_mm, 1e-3)))


def _any_reduce(m: np.ndarray, f: int) -> np.ndarray:
    """Subsample a mask by f (the array cropped to a multiple of f)."""
    if f == 1:
        return m
    h, w = m.shape[0] // f * f, m.shape[1] // f * f
    return m[:h:f, :w:f]


def _lung_only(lung: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The lung mask with its holes filled, less gas: components whose mean is below `GAS_MEAN_HU` (bowel or
    stomach gas the lung mask picked up; lung parenchyma, a mix of air, vessels and tissue, is near −860 HU)."""
    lung = lung[:h.shape[0], :h.shape[1]]
    lab, n = ndi.label(lung)
    if n == 0:
        return lung
    mean = np.bincount(lab.ravel(), weights=h.ravel(), minlength=n + 1) / np.maximum(np.bincount(lab.ravel()), 1)
    keep = mean >= GAS_MEAN_HU
    keep[0] = False
    return fill_holes(keep[lab])


def lung_at_slice(lung: np.ndarray, offset: tuple[int, int], scale: float, shape: tuple[int, int]) -> np.ndarray:
    """A model-resolution lung mask of a square-padded slice (valid_area.LungArea: lung, offset, scale) at the
    slice's own scale and shape."""
    n = int(round(lung.shape[0] * scale))
    big = resize(lung, (n, n))
    oy, ox = offset
    out = np.zeros(shape, bool)
    part = big[oy:oy + shape[0], ox:ox + shape[1]]
    out[:part.shape[0], :part.shape[1]] = part
    return out


def lesion_at_slice(prob: np.ndarray, threshold: float, crop: Rect, boxes: Sequence[Rect],
                    shape: tuple[int, int]) -> np.ndarray | None:
    """The lesion mask at slice scale: `prob` (model scale over `crop`) ≥ threshold, inside the accepted lesion
    boxes only (specks the box filter dropped do not count); None without boxes."""
    if not boxes:
        return None
    out = np.zeros(shape, bool)
    out[crop.y0:crop.y1, crop.x0:crop.x1] = resize(prob >= threshold, (crop.height, crop.width))
    keep = np.zeros(shape, bool)
    for r in boxes:
        keep[r.y0:r.y1, r.x0:r.x1] = True
    return out & keep


def thoracic_envelope(lung: np.ndarray) -> np.ndarray:
    """Convex hull of the lung pixels (both lungs and the mediastinum between them)."""
    edge = lung & ~morph(lung, 1, False)
    ys, xs = np.nonzero(edge)
    if ys.size < 3:
        return lung
    pts = np.c_[xs, ys].astype(float)
    try:
        hull = ConvexHull(pts)
    except (QhullError, ValueError):
        return lung
    img = Image.new("1", (lung.shape[1], lung.shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in pts[hull.vertices]], fill=1, outline=1)
    return np.asarray(img, dtype=bool) | lung


def measure_slice(hu: np.ndarray, lung_mask: np.ndarray, lesion_mask: np.ndarray | None,
                  spacing_mm: tuple[float, float] | float) -> SliceMeasures:
    """Measures of one slice: hu, lung_mask and lesion_mask at slice scale (display orientation).

    The lung is the lung mask and the lesion mask together: the lung mask (the valid-area region) is aerated
    lung, and consolidation or the dense opacity of a severely diseased lung lies outside it, yet is lung (the
    lesion boxes are kept only in the lung: `appliance.pipeline.lesions`). Sides split at the mediastinum (the
    column with least lung between the lungs). Peripheral: distance from the thoracic envelope (`thoracic_envelope`) ≤
    `PERIPHERAL_THIRD` × the deepest lung pixel of that side. Work is done on the lung's bounding box, reduced
    like solid.py (≤ `WORK_MM` per pixel).
    """
    sy, sx = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else spacing_mm  # type: ignore[misc]
    px = float(math.sqrt(sy * sx))
    f = _factor(px)
    out = SliceMeasures(pixel_mm2=round((px * f) ** 2, 4))
    if lung_mask.any() and lesion_mask is not None:
        lung_mask = lung_mask | lesion_mask
    rows = np.flatnonzero(lung_mask.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(lung_mask.any(axis=0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h = block_mean(hu[box], f)
    lung = _lung_only(_any_reduce(lung_mask[box], f), h)
    if not lung.any():
        return out
    mid = midline(lung)
    out.lung_right, out.lung_left = int(lung[:, :mid].sum()), int(lung[:, mid:].sum())
    if lesion_mask is None:
        return out
    les = _any_reduce(lesion_mask[box], f)[:lung.shape[0], :lung.shape[1]] & lung
    if not les.any():
        return out
    h = h[les]
    out.lesion_right, out.lesion_left = int(les[:, :mid].sum()), int(les[:, mid:].sum())
    out.ggo = int(((h >= GGO_HU[0]) & (h < GGO_HU[1])).sum())
    out.consolidation = int(((h >= CONSOLIDATION_HU[0]) & (h <= CONSOLIDATION_HU[1])).sum())
    depth = ndi.distance_transform_edt(np.pad(thoracic_envelope(lung), 1))[1:-1, 1:-1]
    peripheral = np.zeros_like(les)
    for side in (np.s_[:, :mid], np.s_[:, mid:]):
        d = depth[side]
        if lung[side].any():
            peripheral[side] = d <= PERIPHERAL_THIRD * d[lung[side]].max()
    out.peripheral = int((les & peripheral).sum())
    out.central = int((les & ~peripheral).sum())
    posterior = np.zeros_like(les)
    for side in (np.s_[:, :mid], np.s_[:, mid:]):
        rows = np.flatnonzero(lung[side].any(axis=1))
        if rows.size:  # display orientation: the patient's back is at the bottom of the image
            posterior[side][int(math.ceil(rows[-1] - POSTERIOR_THIRD * (rows[-1] - rows[0]))):] = True
    out.posterior = int((les & posterior).sum())
    return out


@dataclass
class Grade:
    """The study grade of a series; percentages of lung volume involved (0–100)."""

    category: str  # "typical" | "indeterminate" | "atypical" | "negative" (RSNA consensus categories)
    reasons: list[str] = field(default_factory=list)
    severity: int = 0  # 0–25
    regions: dict[str, int] = field(default_factory=dict)  # RUL, RML, RLL, LUL, LLL → 0–5
    extent: dict[str, float] = field(default_factory=dict)  # "right", "left", "total" → %
    zones: dict[str, float] = field(default_factory=dict)  # "right upper" … "left lower" → %
    lesion_ml: float = 0.0
    ground_glass_pct: float = 0.0  # of lesion pixels of ground-glass or consolidation density
    peripheral_pct: float = 0.0  # of lesion pixels
    posterior_pct: float = 0.0  # of lesion pixels: in the posterior third of their side's lung

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Grade":
        return cls(category=d["category"], reasons=list(d.get("reasons", [])), severity=int(d.get("severity", 0)),
                   regions={k: int(v) for k, v in d.get("regions", {}).items()},
                   extent={k: float(v) for k, v in d.get("extent", {}).items()},
                   zones={k: float(v) for k, v in d.get("zones", {}).items()},
                   lesion_ml=float(d.get("lesion_ml", 0.0)), ground_glass_pct=float(d.get("ground_glass_pct", 0.0)),
                   peripheral_pct=float(d.get("peripheral_pct", 0.0)),
                   posterior_pct=float(d.get("posterior_pct", 0.0)))

    def describe(self) -> str:
        """'typical (bilateral, peripheral 81 %, ground glass 78 %, multifocal (5 foci)); severity 7/25'."""
        return f"{self.category} ({', '.join(self.reasons)}); severity {self.severity}/25"


def region_score(pct: float) -> int:
    """0 none, 1 < 5 %, 2 5–25 %, 3 26–49 %, 4 50–75 %, 5 > 75 %."""
    if pct <= 0:
        return 0
    return 1 if pct < 5 else 2 if pct <= 25 else 3 if pct < 50 else 4 if pct <= 75 else 5


def _zone_of(pos: float, top: float, bottom: float) -> str:
    t = (top - pos) / max(top - bottom, 1e-6)
    return ZONES[min(2, max(0, int(t * 3)))]


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def grade(measures: Sequence[SliceMeasures | None], foci_count: int, positions: Sequence[float],
          solids: Sequence[SolidLesion] = ()) -> Grade:
    """The grade of a series from its slices' measures (series order; None: not measured) and its positions.

    foci_count: separate lesion foci each spanning a qualifying run (case_logic.foci), less those a solid lesion
    explains; solids: the solid lesions that explain foci (solid.explain) — a nodule or mass is not the viral
    pattern. The extent counts every lesion pixel measured; the category needs a focus or a solid lesion.

    typical: bilateral, peripheral-predominant (≥ `PREDOMINANT`), ground glass ≥ half of the lesion pixels of
    ground-glass or consolidation density, no solid lesion.
    atypical: a solid nodule or mass explains foci; or consolidation-predominant (ground glass < 40 %) that is
    unilateral, single-focus or nodular (small foci: < `NODULAR_ML` on average).
    indeterminate: lesion present, neither (unilateral or central ground glass, mixed patterns).
    negative: less than `MIN_LESION_ML` of lesion and no focus, or no focus and no solid lesion (the case rule's
    view). Foci with less than `MIN_LESION_ML` measured in all (small boxes on thin slices) are indeterminate,
    "minimal lesion": a positive always carries a category.
    """
    spacing = median_spacing(list(positions)) if len(positions) > 1 else 1.0
    spacing = spacing or 1.0
    lung_pos = [p for p, m in zip(positions, measures) if m is not None and m.lung > 0]
    if not lung_pos:
        return Grade("negative", ["no lung measured"])
    top, bottom = max(lung_pos), min(lung_pos)
    vol = {f"{side} {z}": [0.0, 0.0] for side in ("right", "left") for z in ZONES}  # [lung, lesion] mm³
    ggo = cons = periph = central = post = 0.0
    for p, m in zip(positions, measures):
        if m is None or m.lung == 0:
            continue
        z = _zone_of(p, top, bottom)
        v = m.pixel_mm2 * spacing
        vol[f"right {z}"][0] += m.lung_right * v
        vol[f"right {z}"][1] += m.lesion_right * v
        vol[f"left {z}"][0] += m.lung_left * v
        vol[f"left {z}"][1] += m.lesion_left * v
        ggo, cons = ggo + m.ggo * v, cons + m.consolidation * v
        periph, central = periph + m.peripheral * v, central + m.central * v
        post += m.posterior * v
    side = {s: [sum(vol[f"{s} {z}"][k] for z in ZONES) for k in (0, 1)] for s in ("right", "left")}
    lesion = side["right"][1] + side["left"][1]
    lung = side["right"][0] + side["left"][0]
    regions_vol = {"RUL": [vol["right upper"]], "RML": [vol["right middle"]], "RLL": [vol["right lower"]],
                   "LUL": [vol["left upper"], vol["left middle"]], "LLL": [vol["left lower"]]}
    regions = {r: region_score(_pct(sum(x[1] for x in v), sum(x[0] for x in v))) for r, v in regions_vol.items()}
    g = Grade("negative", severity=sum(regions.values()), regions=regions,
              extent={"right": _pct(side["right"][1], side["right"][0]), "left": _pct(side["left"][1], side["left"][0]),
                      "total": _pct(lesion, lung)},
              zones={k: _pct(v[1], v[0]) for k, v in vol.items()}, lesion_ml=round(lesion / 1000.0, 2),
              ground_glass_pct=_pct(ggo, ggo + cons), peripheral_pct=_pct(periph, periph + central),
              posterior_pct=_pct(post, periph + central))
    if foci_count > 0 and lesion / 1000.0 < MIN_LESION_ML:  # foci too small to measure a pattern on
        g.category = "indeterminate"
        g.reasons = [f"minimal lesion ({lesion / 1000.0:.2f} ml measured): too little to grade a pattern",
                     f"multifocal ({foci_count} foci)" if foci_count >= 2 else "single focus"]
        return g
    if lesion / 1000.0 < MIN_LESION_ML or (foci_count == 0 and not solids):
        g.reasons = ["no lesion" if lesion / 1000.0 < MIN_LESION_ML else "no lesion focus spanning a run"]
        g.severity, g.regions = 0, {r: 0 for r in REGIONS}  # the extent still shows what was measured
        return g
    g.category, g.reasons = _category(side, lesion, ggo, cons, periph, central, foci_count, solids)
    if g.posterior_pct >= 100 * DEPENDENT_SHARE and g.extent["total"] < DEPENDENT_MAX_PCT:
        g.reasons.append(f"posterior {g.posterior_pct:.0f} % ({DEPENDENT_ADVICE})")
    return g


def _category(side: dict[str, list[float]], lesion: float, ggo: float, cons: float, periph: float,
              central: float, foci_count: int, solids: Sequence[SolidLesion]) -> tuple[str, list[str]]:
    involved = [s for s in ("right", "left")
                if side[s][1] / 1000.0 >= SIDE_MIN_ML and side[s][1] >= SIDE_MIN_SHARE * lesion]
    bilateral = len(involved) == 2
    reasons = ["bilateral" if bilateral else f"unilateral ({involved[0] if involved else 'minimal'})"]
    p = periph / max(periph + central, 1e-9)
    if p >= PREDOMINANT:
        reasons.append(f"peripheral {100 * p:.0f} %")
    elif p <= 1 - PREDOMINANT:
        reasons.append(f"central {100 * (1 - p):.0f} %")
    else:
        reasons.append(f"peripheral and central ({100 * p:.0f} % peripheral)")
    gg = ggo / max(ggo + cons, 1e-9)
    reasons.append(f"ground glass {100 * gg:.0f} %" if gg >= 0.5 else f"consolidation {100 * (1 - gg):.0f} %")
    if foci_count:
        reasons.append(f"multifocal ({foci_count} foci)" if foci_count >= 2 else "single focus")
    nodular = gg < 0.5 and foci_count >= 1 and lesion / 1000.0 / foci_count < NODULAR_ML
    if solids:
        kinds = sorted({s.kind for s in solids})
        reasons.append(f"solid {' and '.join(kinds)}")
    elif nodular:
        reasons.append("nodular")
    if solids or (gg < 1 - PREDOMINANT and (not bilateral or foci_count <= 1 or nodular)):
        return "atypical", reasons
    if bilateral and p >= PREDOMINANT and gg >= 0.5:
        return "typical", reasons
    return "indeterminate", reasons
