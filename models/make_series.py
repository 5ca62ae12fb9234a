"""Write the research HU volumes (NIfTI) as DICOM series in a scratch folder, for whole-series validation.

    python -m models.make_series /tmp/ctriage-val-series

Real HU data, never written into the project. The series carry no patient identifiers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

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
        # RAS voxel (i, j) → display: rows anterior→posterior, columns right→left (LPS +x is left)
        sl = np.rot90(vol[:, :, k])  # rows: A→P, cols: R→L
        stored = np.clip(np.round(sl + 1024), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * zz]
        ds.SliceThickness = zz
        ds.PixelSpacing = [zy, zx]
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        ds.save_as(out / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return n


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    base = DATA / "totalsegmentator-ct-nifti" / "tests" / "reference_files"
    n1 = write_volume(base / "pulmonary_report" / "models" / "ct_cropped.nii.gz", out / "ts-chest-1.5mm", "normal chest crop")
    n2 = write_volume(base / "example_ct.nii.gz", out / "ts-abdomen-3mm", "abdomen with lung bases")
    print(f"{out}: ts-chest-1.5mm {n1} slices, ts-abdomen-3mm {n2} slices")


if __name__ == "__main__":
    main()
