"""Write the research HU volumes (NIfTI) as DICOM series in a scratch folder, for whole-series validation.

    python -m models.make_series /tmp/ctriage-val-series

The TotalSegmentator chest crop and abdomen, and the TB Portals volumes (tb1-tb3, 128×128×64). Real HU data,
never written into the project (licences: research use only). The series carry no patient identifiers.
"""
from __future__ import annotations

import argparse
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


TB = DATA / "tb-portal-volumes" / "data"


def volumes() -> dict[str, tuple[Path, str]]:
    """Folder name -> (NIfTI volume, series description) of every research volume present."""
    tb = {f"tb{k + 1}": (p, "tuberculosis, 128×128×64") for k, p in enumerate(sorted(TB.glob("*x64.nii.gz")))}
    return {**{k: v for k, v in VOLUMES.items() if v[0].exists()}, **tb}


def write_volumes(out: Path, names: tuple[str, ...] | None = None) -> dict[str, int]:
    """Every research volume present (or those `names`) as a DICOM series in out/<name>/; returns the slice count
    of each."""
    return {name: write_volume(path, out / name, desc) for name, (path, desc) in volumes().items()
            if names is None or name in names}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="scratch folder to write the series into (outside the project)")
    out = ap.parse_args(argv).out.resolve()
    if Path(__file__).resolve().parents[1] in [out, *out.parents]:
        ap.error(f"{out} is inside the project: the research data must not be copied into it")
    written = write_volumes(out)
    if not written:
        ap.error(f"no research volumes found under {DATA}")
    print(f"{out}:", ", ".join(f"{k} {n} slices" for k, n in written.items()))


if __name__ == "__main__":
    main()
