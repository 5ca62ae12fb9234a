"""Solid nodules and masses, pure numpy + scipy: what the lesion model cannot tell from COVID-19 ground glass.

The lesion model marks ground glass and the hazy halo around lesions; the halo of a tumour looks like COVID-19
ground glass to it. What the HU show directly is the solid part: a compact soft-tissue component (≥ `SOLID_HU`,
≥ `MIN_DIAMETER_MM`) inside the lung envelope, surrounded by lung rather than continuous with the chest wall or
the mediastinum, and round in 3-D (its z-extent comparable to its in-plane diameter). Vessels are just as dense
but thin and branching in-plane, and in 3-D long along z or moving slice to slice.

Per slice (`solid_components`): the lung envelope is the aerated lung (< `AIR_HU`, gas left out) of each lung,
closed by `CLOSE_MM` and with its holes filled, so that a nodule surrounded by lung, or a small one on the
pleura, lies inside it. Soft tissue (≥ `SOLID_HU`) opened by `OPEN_MM` (vessels and septa thinner than about
3 mm go) and cut to the envelope gives the components. One whose soft tissue continues outside the envelope
(through a connection ≥ ~3 mm thick: not a thin pleural tag) is `attached`: continuous with the chest wall or
the mediastinum, as a pleural-based or extrapulmonary lesion is — and as the heart, aorta and hila are where
they bulge into the lung. `rim_air` is the share of aerated lung in the `RIM_MM` around a component.

Per series: `appliance.pipeline.solid_lesions` follows the components into nodules and masses and says which
lesion foci are their halo.

What it does not do: tell a mass that is broad-based on the chest wall or mediastinum from those structures
(attached: not reported), nor report a smooth nodule in aerated lung (a vessel crossing the slice looks the
same; the lesion model has no halo to mark there either), nor a ground-glass (subsolid) nodule.

Slices are in display orientation; the working grid is the lung box, reduced to about `WORK_MM` per pixel.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from appliance.domain import Rect, Solid

AIR_HU = -320.0  # aerated lung, ground glass included (classic_lung's threshold)
SOLID_HU = -100.0  # soft tissue: the solid part of a nodule or mass (fat and ground glass are below)
WORK_MM = 1.7  # working pixel size (mm): the slice is reduced by the largest integer factor that stays below
CLOSE_MM = 6.0  # lung closed by this radius before filling holes: a small nodule on the pleura lies inside
OPEN_MM = 1.5  # soft tissue opened by this radius: vessels thinner than about twice it go
MASK_GROW_MM = 8.0  # the lung region (a coarse model output) grown by this: its edge may
# cut the aerated lung beside a nodule on the pleura (it is there to keep gas below the diaphragm out)
MIN_LUNG_MM2 = 200.0  # aerated components smaller than this are not lung (airways, gas bubbles)
GAS_MEAN_HU = -950.0  # ... nor are those this dark on average (gas)
MIN_DIAMETER_MM = 5.0  # smallest solid lesion reported (the size a radiologist starts to call a nodule) ...
SECTION_MM = 4.0  # ... and smallest section followed (the poles of a 6 mm nodule on thin slices)
MIN_COMPACTNESS = 0.3  # area / (π d² / 4): an in-plane vessel segment is far below, a round nodule near 1
RIM_MM = 6.0  # the rim around a component that ...
RIM_AIR_HU = -750.0  # ... is aerated lung below this (ground glass, spicules and partial volume are above)


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f×f blocks (the array cropped to a multiple of f), float32."""
    if f == 1:
        return a.astype(np.float32, copy=False)
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    out = np.zeros((h // f, w // f), np.float32)
    for dy in range(f):
        for dx in range(f):
            out += a[dy:h:f, dx:w:f]
    out *= np.float32(1.0 / (f * f))
    return out


def morph(mask: np.ndarray, r: int, grow: bool) -> np.ndarray:
    """Dilation (grow) or erosion of a boolean mask by r steps of the 3×3 cross (a diamond of radius r), with
    array shifts: several times faster than scipy.ndimage on these small masks. Erosion treats outside the
    array as set."""
    out = mask
    for _ in range(r):
        t = out.copy()
        if grow:
            t[1:] |= out[:-1]
            t[:-1] |= out[1:]
            t[:, 1:] |= out[:, :-1]
            t[:, :-1] |= out[:, 1:]
        else:
            t[1:] &= out[:-1]
            t[:-1] &= out[1:]
            t[:, 1:] &= out[:, :-1]
            t[:, :-1] &= out[:, 1:]
        out = t
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes filled (background not connected to the border), by one labelling."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    border = np.zeros(n + 1, bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        border[edge] = True
    border[0] = True
    return mask | ~border[lab]


def work_factor(spacing_mm: float) -> int:
    """Largest integer reduction that keeps the pixel size ≤ `WORK_MM` (0.59–0.85 mm → 2)."""
    return max(1, int(WORK_MM / max(spacing_mm, 1e-3)))


def midline(lung: np.ndarray) -> int:
    """Column between the lungs: the one with least lung in the middle 30 % of the lung's width."""
    cols = np.flatnonzero(lung.any(axis=0))
    if cols.size == 0:
        return lung.shape[1] // 2
    lo_c, w = int(cols[0]), int(cols[-1] + 1 - cols[0])
    lo, hi = lo_c + int(w * 0.35), max(lo_c + int(w * 0.65), lo_c + int(w * 0.35) + 1)
    return lo + int(np.argmin(lung[:, lo:hi].sum(axis=0)))


def lung_envelope(aerated: np.ndarray, close_px: int) -> np.ndarray:
    """Each lung (either side of the mediastinum) closed by `close_px` and its holes filled: the region a nodule
    surrounded by lung lies in. The lungs are closed separately, so the mediastinum never becomes a hole."""
    env = np.zeros_like(aerated)
    mid = midline(aerated)
    pad = close_px + 1
    for cols in (slice(0, mid), slice(mid, aerated.shape[1])):
        part = aerated[:, cols]
        if not part.any():
            continue
        p = np.pad(part, pad)
        if close_px > 0:
            p = morph(morph(p, close_px, True), close_px, False)
        env[:, cols] = fill_holes(p)[pad:-pad, pad:-pad]
    return env


def _lung_parts(aerated: np.ndarray, h: np.ndarray, min_px: float) -> np.ndarray:
    """Aerated components that are lung: large enough, and not gas (mean below `GAS_MEAN_HU`: bowel or stomach
    gas, the trachea; lung parenchyma, a mix of air, vessels and tissue, is near −860 HU)."""
    lab, n = ndi.label(aerated)
    if n == 0:
        return aerated
    flat = lab.ravel()
    size = np.bincount(flat, minlength=n + 1)
    mean = np.bincount(flat, weights=h.ravel(), minlength=n + 1) / np.maximum(size, 1)
    keep = (size >= min_px) & (mean >= GAS_MEAN_HU)
    keep[0] = False
    return keep[lab]


def _feret(ys: np.ndarray, xs: np.ndarray) -> float:
    """Largest extent (pixels) over 0°, 45°, 90°, 135°."""
    d = max(np.ptp(ys), np.ptp(xs)) + 1.0
    return float(max(d, (max(np.ptp(ys + xs), np.ptp(ys - xs)) + 1.0) / math.sqrt(2.0)))


def _rim_air(h: np.ndarray, lab: np.ndarray, sl: tuple[slice, slice], i: int, rim: int) -> float:
    """Share of aerated lung (< `RIM_AIR_HU`) in the `rim` pixels around component i."""
    y0, x0 = max(sl[0].start - rim, 0), max(sl[1].start - rim, 0)
    win = np.s_[y0:sl[0].stop + rim, x0:sl[1].stop + rim]
    own = lab[win] == i
    ring = morph(own, rim, True) & ~own
    return float((h[win][ring] < RIM_AIR_HU).mean()) if ring.any() else 0.0


def solid_components(hu: np.ndarray, lung_box: Rect, spacing_mm: tuple[float, float] | float,
                     lung_mask: np.ndarray | None = None) -> list[Solid]:
    """Soft-tissue components inside the lung envelope of one slice (display orientation), largest first.

    lung_mask (optional, slice shape): where lung may be (e.g. the valid-area region): aerated pixels outside it
    (bowel or stomach gas, the trachea) are not lung. Components below `SECTION_MM` or elongated (vessels
    in-plane: area < `MIN_COMPACTNESS` of the disk of their diameter) are left out; attached ones are kept and
    flagged.
    """
    sy, sx = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else spacing_mm  # type: ignore[misc]
    px = float(math.sqrt(sy * sx))
    f = work_factor(px)
    mm = px * f
    b = lung_box
    h = block_mean(hu[b.y0:b.y1, b.x0:b.x1], f)
    if h.shape[0] < 4 or h.shape[1] < 4:
        return []
    aerated = h < AIR_HU
    if lung_mask is not None:
        m = lung_mask[b.y0:b.y1, b.x0:b.x1][::f, ::f][:aerated.shape[0], :aerated.shape[1]]
        aerated &= morph(m, int(round(MASK_GROW_MM / mm)), True)
    aerated = _lung_parts(aerated, h, MIN_LUNG_MM2 / mm ** 2)
    if not aerated.any():
        return []
    env = lung_envelope(aerated, int(round(CLOSE_MM / mm)))
    r = int(round(OPEN_MM / mm))
    dense = h >= SOLID_HU
    solid = morph(morph(dense, r, False), r, True) if r > 0 else dense
    eight = np.ones((3, 3), bool)
    whole, n_whole = ndi.label(solid, structure=eight)  # soft tissue of the whole box: body wall, mediastinum
    lab, n = ndi.label(solid & env, structure=eight)  # ... the parts of it inside the lung envelope
    if n == 0:
        return []
    flat = lab.ravel()
    area = np.bincount(flat, minlength=n + 1)
    min_px = MIN_COMPACTNESS * math.pi * (SECTION_MM / mm) ** 2 / 4.0
    cand = np.flatnonzero(area >= min_px)
    cand = cand[cand > 0]
    if cand.size == 0:
        return []
    # a part is attached when the soft tissue it belongs to continues outside the envelope (after the opening,
    # so through a connection at least ~3 mm thick: not a thin pleural tag or a vessel)
    beyond = np.bincount(whole[~env], minlength=n_whole + 1) > 0
    beyond[0] = False
    hu_sum = np.bincount(flat, weights=h.ravel(), minlength=n + 1)
    rim = max(1, int(round(RIM_MM / mm)))
    objs = ndi.find_objects(lab)
    out: list[Solid] = []
    for i in cand:
        sl = objs[i - 1]
        own = lab[sl] == i
        ys, xs = np.nonzero(own)
        d_mm = _feret(ys, xs) * mm
        a_mm2 = float(area[i]) * mm * mm
        if d_mm < SECTION_MM or a_mm2 < MIN_COMPACTNESS * math.pi * d_mm ** 2 / 4.0:
            continue
        rect = Rect(b.y0 + sl[0].start * f, b.x0 + sl[1].start * f, b.y0 + sl[0].stop * f, b.x0 + sl[1].stop * f)
        attached = bool(beyond[whole[sl][own][0]])
        out.append(Solid(rect, round(a_mm2, 1), round(d_mm, 1), float(round(hu_sum[i] / area[i])),
                         attached, round(px, 4), round(_rim_air(h, lab, sl, i, rim), 2)))
    out.sort(key=lambda s: -s.area_mm2)
    return out


# --- per series ----------------------------------------------------------------------------------------------
