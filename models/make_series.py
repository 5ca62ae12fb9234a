"""Write the research HU volumes (NIfTI) as DICOM series in a scratch folder, for whole-series validation.

    python -m models.make_series /tmp/ctriage-val-series

Real HU data, never written into the project. The series carry no patient identifiers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from appliance.phantom import ct_slice_dataset
from models.data import DATA


def write_volume(vol_path: Path, out: Path, description: str) -> int:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(vol_path)))  # RAS
    vol = np.asarray(img.get_fdata(), dtype=np.float32)
    zx, zy, zz = (float(v) for v in img.header.get_zooms()[:3])
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    n = vol.shape[2]
    for k in range(n):
        # RAS voxel (i, j) → display: rows anterior→posterior, columns right→left
        ds = ct_slice_dataset(np.rot90(vol[:, :, k]), study_uid=study, series_uid=series, instance=k + 1,
                              z_mm=k * zz, spacing_mm=(zy, zx), thickness_mm=zz, description=description)
        ds.save_as(out / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return n


TS = DATA / "totalsegmentator-ct-nifti" / "tests" / "reference_files"
VOLUMES = {  # folder name -> (NIfTI volume, series description)
    "ts-chest": (TS / "pulmonary_report" / "models" / "ct_cropped.nii.gz", "normal chest crop, 1.5 mm"),
    "ts-abdomen": (TS / "example_ct.nii.gz", "abdomen with lung bases, 3 mm"),
}


def write_volumes(out: Path) -> dict[str, int]:
    """Every research volume as a DICOM series in out/<name>/; returns the slice count of each."""
    return {name: write_volume(path, out / name, desc) for name, (path, desc) in VOLUMES.items()}


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    print(f"{out}:", ", ".join(f"{k} {n} slices" for k, n in write_volumes(out).items()))


if __name__ == "__main__":
    main()
