"""The project's own files (git): no research scans committed — ../shared/data is licensed for non-commercial
research only and must never be copied into the project, whatever tool wrote it where."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".npy", ".jpg", ".jpeg", ".png")


def tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (or git is not installed): nothing tracked to check")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_scans_or_slice_images_are_tracked():
    files = tracked()
    assert files, "git ls-files listed nothing"
    images = [p for p in files if p.lower().endswith(IMAGE_SUFFIXES)]
    dicom = []
    for p in files:
        path = ROOT / p
        if path.is_file() and path.stat().st_size > 132:
            with path.open("rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    dicom.append(p)
    assert not images and not dicom, f"scan data tracked in the project: {(images + dicom)[:5]}"


def test_no_tracked_path_looks_like_an_option():
    odd = [p for p in tracked() if any(part.startswith("-") for part in Path(p).parts)]
    assert not odd, f"paths that an option written as an output folder left behind: {odd[:5]}"
