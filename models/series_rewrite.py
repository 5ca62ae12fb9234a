"""Rewrite a real CT series slice by slice (a change to its HU), as a new series in a scratch folder: the probes'
way to ask "what would the appliance say if this scan had X" (models.dependent_density, models.scan_noise).

The series is the folder's largest one (annotations and other files are skipped); it is written through the
appliance's own CT writer (uncompressed, 12-bit, same positions, spacing and thickness, new UIDs, no patient data).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

# change(hu, pixel_mm, k, n) -> (hu, pixel spacing (row, col) mm): slice k of n, head to feet, display orientation
Change = Callable[[np.ndarray, tuple[float, float], int, int], tuple[np.ndarray, tuple[float, float]]]


def rewrite_series(src: Path, out: Path, change: Change, description: str, enlarge: int = 1) -> int:
    """The axial CT series in `src` with `change` applied to each slice, written to `out`; returns the slice
    count. `enlarge`: each slice is first enlarged that many times in-plane (cubic; the pixel spacing divided), so
    that a change lands at a clinical pixel size on a coarse research volume. A folder without CT slices that
    carry a position is a clear error."""
    if enlarge < 1:
        raise ValueError(f"enlarge must be a whole factor ≥ 1, got {enlarge}")
    import pydicom
    from pydicom.uid import generate_uid

    from appliance.phantom import ct_slice_dataset

    heads = []
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
            z = float(ds.ImagePositionPatient[2])
        except Exception:  # not a CT slice (annotations, licences): not part of the series
            continue
        heads.append((str(ds.SeriesInstanceUID), -z, ds))
    if not heads:
        raise ValueError(f"{src}: no CT slices with a position")
    uids = [h[0] for h in heads]
    main = max(set(uids), key=uids.count)
    slices = sorted((h for h in heads if h[0] == main), key=lambda h: h[1])
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k, (_, negz, ds) in enumerate(slices):
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        spacing = tuple(float(v) / enlarge for v in ds.PixelSpacing)
        if enlarge > 1:
            hu = ndi.zoom(hu, enlarge, order=3, mode="nearest")
        hu, spacing = change(hu, spacing, k, len(slices))  # type: ignore[arg-type]
        new = ct_slice_dataset(hu, study_uid=study, series_uid=series, instance=k + 1, z_mm=-negz,
                               spacing_mm=spacing, thickness_mm=float(getattr(ds, "SliceThickness", 0) or 0) or 1.0,
                               description=description)
        new.save_as(out / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return len(slices)
