"""Resample a DICOM series along the slice normal: a thin-slice series from a thick one, for benchmarking.

`ctriage bench PATH --resample 1.25` measures the pipeline on PATH's series rewritten at 1.25 mm spacing: each new
slice keeps the full header of its nearest source slice (vendor tags, sizes and transfer of a real export) with
new UIDs, position and instance number, and its pixels are interpolated linearly in HU between the two source
slices around it. The pixels are interpolated, not measured, so such a series is for speed and memory only —
never for accuracy figures.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.ingest.dicom_reader import Rejected, _floats, read_slice, slice_normal
from appliance.ingest.jpeg_decoder import decode_pixels
from appliance.ingest.series import group_series, sort_key


class ResampleError(Exception):
    pass


def _stored_to_hu(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return raw.astype(np.float32) * slope + intercept


def _hu_to_stored(hu: np.ndarray, ds: pydicom.Dataset, dtype: np.dtype) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    info = np.iinfo(dtype)
    return np.clip(np.rint((hu - intercept) / slope), info.min, info.max).astype(dtype)


def resample_series(src: Path, out: Path, spacing_mm: float) -> int:
    """Write the largest series found under `src` again at `spacing_mm` between slices into `out` (created);
    returns the number of slices written."""
    if not 0.1 <= spacing_mm <= 20:
        raise ResampleError(f"spacing {spacing_mm} mm is outside 0.1–20 mm")
    files = [p for p in sorted(Path(src).rglob("*")) if p.is_file()] if Path(src).is_dir() else [Path(src)]
    headers = []
    for p in files:
        try:
            headers.append(read_slice(p, with_pixels=False))
        except Rejected:
            continue
    if not headers:
        raise ResampleError(f"{src}: no usable CT slices")
    series = max(group_series(headers), key=lambda s: len(s.slices))
    slices = sorted(series.slices, key=sort_key)  # head → feet: positions descending
    if len(slices) < 2:
        raise ResampleError(f"{src}: a series of {len(slices)} slice cannot be resampled")
    dss = [s.source if s.source is not None else pydicom.dcmread(s.key) for s in slices]  # headers parsed once
    pos = np.array([s.position for s in slices], dtype=float)
    if np.any(np.diff(pos) >= 0):
        raise ResampleError(f"{src}: slices share a position; cannot interpolate between them")
    raws, hus = [], []
    for s, ds in zip(slices, dss):
        try:
            raws.append(decode_pixels(ds))
            hus.append(_stored_to_hu(raws[-1], ds))
        except Exception as e:  # pydicom and its decoders raise many kinds
            raise ResampleError(f"{s.key}: pixel data could not be decoded ({type(e).__name__}: {e})") from None
    shape = hus[0].shape
    if any(h.shape != shape for h in hus):
        raise ResampleError(f"{src}: slices of different sizes")
    iop = _floats(dss[0].get("ImageOrientationPatient"), 6) or [1, 0, 0, 0, 1, 0]
    normal = slice_normal(iop)
    loc = [float(ds.SliceLocation) if ds.get("SliceLocation") not in (None, "") else None for ds in dss[:2]]
    loc_sign = 1.0 if None in loc or loc[0] == loc[1] else float(np.sign((loc[0] - loc[1]) / (pos[0] - pos[1])))
    targets = np.arange(pos[0], pos[-1] - 1e-6, -spacing_mm)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k, t in enumerate(targets):
        i = int(min(np.searchsorted(-pos, -t, side="right") - 1, len(pos) - 2))  # pos[i] ≥ t ≥ pos[i + 1]
        w = float((pos[i] - t) / (pos[i] - pos[i + 1]))
        near = i if w < 0.5 else i + 1
        tmpl = dss[near]
        ds = copy.deepcopy(tmpl)
        hu = (1.0 - w) * hus[i] + w * hus[i + 1]
        stored = _hu_to_stored(hu, tmpl, raws[near].dtype)
        pad = tmpl.get("PixelPaddingValue")
        if pad is not None:  # padding stays padding where the nearest source slice has it
            stored[raws[near] == int(pad)] = int(pad)
        delta = float(t - pos[near])
        ipp = _floats(tmpl.get("ImagePositionPatient"), 3)
        if ipp is not None:
            ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ipp) + delta * normal]
        if ds.get("SliceLocation") not in (None, ""):
            ds.SliceLocation = f"{float(tmpl.SliceLocation) + loc_sign * delta:.4f}"
        ds.InstanceNumber = k + 1
        ds.SliceThickness = f"{spacing_mm:g}"
        if "SpacingBetweenSlices" in ds:
            ds.SpacingBetweenSlices = f"{spacing_mm:g}"
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = f"{tmpl.get('SeriesDescription', '') or 'series'} resampled {spacing_mm:g} mm"[:64]
        if "ImagesInAcquisition" in ds:
            ds.ImagesInAcquisition = len(targets)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds["PixelData"].VR = "OW"
        ds.save_as(out / f"{k + 1:04d}.dcm")
    return len(targets)
