"""Training data for both models, built from ../shared/data (never copied into the project).

`prepare_lesion()` and `prepare_valid_area()` turn the raw sources into compact uint8 arrays cached outside the
repository (default ~/.cache/ctriage-train), with a fixed, seeded split recorded next to them.

Lesion sources and how they are used:
  doctor   50 radiologist-labelled MedSeg crops (hard masks)           → 40 train / 10 validation
  pseudo   1189 consecutive crops, 14 patients, Semi-Inf-Net soft labels → 12 patients train / 2 validation
  noncovid 700 real non-COVID lung crops (SARS-CoV-2 CT-scan set)        → 560 train / 140 validation
  hu-neg   lung-box crops made by *our* pipeline from real HU slices without COVID (Lung-PET-CT-Dx A0001 with its
           tumour, TotalSegmentator chest and abdomen volumes, lungmask and NEMA slices, NY-SBU abdomen-level
           slices): negatives in the exact domain the appliance sees
The three crop sources use different display windows; each is remapped to the appliance's lung window
[-1350, 150] HU by two landmarks (parenchyma and soft-tissue histogram peaks) so that the window itself cannot
become a shortcut for "COVID".
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.imaging import resize, to_uint8, window
from appliance.pipeline.classic_lung import lung_mask, mask_box

DATA = Path(os.environ.get("CTRIAGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CACHE = Path(os.environ.get("CTRIAGE_TRAIN_CACHE", Path.home() / ".cache" / "ctriage-train"))
SEMI = DATA / "covid-semiseg" / "TrainingSet" / "LungInfection-Train"

LESION_SIZE = 256
VALID_SIZE = 128
CROP_MARGIN = 0.03  # the lung box is grown by this fraction of its size on each side (same as the appliance)

# Where lung parenchyma and soft tissue land in [0, 255] under the appliance's lung window.
CANON_LUNG, CANON_SOFT = 82.0, 234.0
NYSBU_ABDOMEN = ("A027284", "A058062", "A062055", "A067967")
VAL_PSEUDO_PATIENTS = ("coronacases_org_002", "radiopaedia_org_covid-19-pneumonia-27_86410_0-dcm")


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def histogram_landmarks(images: list[np.ndarray]) -> tuple[float, float]:
    """Parenchyma peak (dark half) and soft-tissue peak (bright half) of a set of 8-bit crops."""
    h = np.zeros(256)
    for a in images:
        h += np.bincount(a.astype(np.uint8).ravel(), minlength=256)
    h = np.convolve(h, np.ones(5) / 5, "same")
    return float(np.argmax(h[5:128]) + 5), float(np.argmax(h[128:250]) + 128)


def remap(a: np.ndarray, lung: float, soft: float) -> np.ndarray:
    """Linear grey remap putting the landmarks at the canonical lung-window positions."""
    k = (CANON_SOFT - CANON_LUNG) / (soft - lung)
    return np.clip(CANON_LUNG + (a - lung) * k, 0, 255)


def _fit(a: np.ndarray, size: int = LESION_SIZE) -> np.ndarray:
    return resize(a.astype(np.float32), (size, size))


def read_hu(path: str | Path) -> tuple[np.ndarray, float]:
    """A DICOM slice as HU (padding clamped) and its pixel area in mm² — training-side helper."""
    import pydicom

    d = pydicom.dcmread(str(path))
    hu = d.pixel_array.astype(np.float32) * float(d.get("RescaleSlope", 1) or 1) + float(d.get("RescaleIntercept", 0) or 0)
    hu[hu < -1024] = -1024
    ps = [float(v) for v in d.get("PixelSpacing", [0.7, 0.7])]
    return hu, ps[0] * ps[1]


def nifti_slices(path: Path) -> tuple[list[np.ndarray], float]:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = np.asarray(img.get_fdata(), dtype=np.float32)
    zx, zy = img.header.get_zooms()[:2]
    # RAS canonical: rotate so anterior is up (display orientation); orientation is augmented anyway.
    return [np.rot90(vol[:, :, k]) for k in range(vol.shape[2])], float(zx * zy)


def hu_crop(hu: np.ndarray, pixel_area: float, field_inside_body: bool = False) -> np.ndarray | None:
    """Lung-window lung-box crop of an HU slice, as the appliance makes it; None when no lung.

    `field_inside_body`: the field of view is a crop inside the chest (no outside air to find the body by).
    """
    if field_inside_body:
        from scipy import ndimage as ndi

        m = ndi.binary_opening(hu < -320, iterations=1)
        if m.sum() * pixel_area / 100.0 < 6.0:
            return None
    else:
        m = lung_mask(hu, pixel_area)
    box = mask_box(m, CROP_MARGIN)
    if box is None:
        return None
    y0, x0, y1, x1 = box
    if (y1 - y0) < 24 or (x1 - x0) < 24:
        return None
    return window(hu[y0:y1, x0:x1]) * 255.0


@dataclass
class HUSlice:
    source: str
    hu: np.ndarray
    pixel_area: float


def hu_negative_slices() -> list[HUSlice]:
    """Real HU slices without COVID (the NY-SBU ones only at abdomen level)."""
    out: list[HUSlice] = []
    for f in sorted(glob.glob(str(DATA / "lung-pet-ct-dx-A0001" / "**" / "*.dcm"), recursive=True)):
        hu, pa = read_hu(f)
        out.append(HUSlice("a0001", hu, pa))
    for name in ("lungmask-testdata/tests/testdata/0.dcm", "lungmask-testdata/tests/testdata/1.dcm",
                 "dwv-testdata/tests/data/nema-ct1_jpll.dcm"):
        hu, pa = read_hu(DATA / "dicom-ct-zoo" / name)
        out.append(HUSlice("zoo", hu, pa))
    for f in sorted(glob.glob(str(DATA / "dicom-ct-zoo" / "totalsegmentator-example_ct_dicom" / "**" / "CT*"), recursive=True)):
        hu, pa = read_hu(f)
        out.append(HUSlice("zoo-ts", hu, pa))
    for sub in ("tests/reference_files/pulmonary_report/models/ct_cropped.nii.gz", "tests/reference_files/example_ct.nii.gz"):
        sl, pa = nifti_slices(DATA / "totalsegmentator-ct-nifti" / sub)
        tag = "ts-chest" if "cropped" in sub else "ts-abdomen"
        out += [HUSlice(tag, s, pa) for s in sl[::2]]
    # NY-SBU patients have COVID: only their abdomen-level slices (checked by eye) are negatives. A small lung
    # area alone is not enough: a consolidated COVID lung also has little air.
    for patient in NYSBU_ABDOMEN:
        for f in sorted(glob.glob(str(DATA / "covid19-ny-sbu-dicom" / "data-sample" / patient / "axial" / "*.dcm"))):
            out.append(HUSlice("nysbu-abdomen", *read_hu(f)))
    return out


def _natural_key(p: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]


def doctor_files() -> list[str]:
    """The 50 radiologist-labelled crops, in natural name order."""
    return sorted(glob.glob(str(SEMI / "Doctor-label" / "Imgs" / "*.jpg")), key=_natural_key)


def noncovid_files() -> list[str]:
    """The 700 non-COVID crops, in natural name order."""
    return sorted(glob.glob(str(DATA / "sarscov2-ct-noncovid" / "*.png")), key=_natural_key)


def held_out(seed: int = 0) -> dict[str, set[int]]:
    """Indices (into doctor_files / noncovid_files) held back for validation: 10 of 50 and 140 of 700.
    The one place the split is drawn, so training and `models.make_eval_set` cannot drift apart."""
    rng = np.random.default_rng(seed)
    doctor = set(rng.choice(50, 10, replace=False).tolist())
    noncovid = set(rng.choice(700, 700 // 5, replace=False).tolist())
    return {"doctor": doctor, "noncovid": noncovid}


def prepare_lesion(cache: Path = CACHE, seed: int = 0) -> Path:
    """Build (or reuse) the lesion training cache; returns the .npz path."""
    out = cache / f"lesion_{LESION_SIZE}.npz"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    X, Y, src, split, group = [], [], [], [], []

    def add(img, mask, s, sp, g):
        X.append(to_uint8(_fit(img) / 255.0))
        Y.append(to_uint8(_fit(mask) / 255.0) if mask is not None else np.zeros((LESION_SIZE,) * 2, np.uint8))
        src.append(s), split.append(sp), group.append(g)

    doc, non = doctor_files(), noncovid_files()
    held = held_out(seed)
    imgs = [_grey(Path(p)) for p in doc]
    lm = histogram_landmarks(imgs)
    val_idx = held["doctor"]
    for i, (p, a) in enumerate(zip(doc, imgs)):
        gt = _grey(SEMI / "Doctor-label" / "GT" / (Path(p).stem + ".png"))
        add(remap(a, *lm), (gt > 127) * 255.0, "doctor", "val" if i in val_idx else "train", Path(p).stem)

    pseudo = sorted(glob.glob(str(SEMI / "Pseudo-label" / "Imgs" / "*.jpg")), key=_natural_key)
    imgs = [_grey(Path(p)) for p in pseudo]
    lm = histogram_landmarks(imgs[::4])
    for p, a in zip(pseudo, imgs):
        patient = re.sub(r"^Data-1_|_\d+\.jpg$", "", Path(p).name)
        gt = _grey(SEMI / "Pseudo-label" / "GT" / (Path(p).stem + ".png"))
        add(remap(a, *lm), gt, "pseudo", "val" if patient in VAL_PSEUDO_PATIENTS else "train", Path(p).stem)

    imgs = [_grey(Path(p)) for p in non]
    lm = histogram_landmarks(imgs[::3])
    val_idx = held["noncovid"]
    for i, (p, a) in enumerate(zip(non, imgs)):
        add(remap(a, *lm), None, "noncovid", "val" if i in val_idx else "train", Path(p).stem)

    for k, s in enumerate(hu_negative_slices()):
        crop = hu_crop(s.hu, s.pixel_area, field_inside_body=s.source == "ts-chest")
        if crop is None:
            continue
        sp = "val" if (s.source == "ts-chest" and k % 3 == 0) else "train"
        add(crop, None, "hu-" + s.source, sp, f"{s.source}-{k}")

    np.savez_compressed(out, x=np.stack(X), y=np.stack(Y), src=np.array(src), split=np.array(split),
                        group=np.array(group))
    summary: dict[str, int] = {}
    for s, sp in zip(src, split):
        summary[f"{s}/{sp}"] = summary.get(f"{s}/{sp}", 0) + 1
    (cache / f"lesion_{LESION_SIZE}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return out


def valid_area_slices() -> list[HUSlice]:
    """Real full slices for the valid-area model: chest, neck and abdomen levels."""
    out: list[HUSlice] = []
    for f in sorted(glob.glob(str(DATA / "lung-pet-ct-dx-A0001" / "**" / "*.dcm"), recursive=True)):
        out.append(HUSlice("a0001", *read_hu(f)))
    for f in sorted(glob.glob(str(DATA / "covid19-ny-sbu-dicom" / "**" / "axial" / "*.dcm"), recursive=True)):
        out.append(HUSlice("nysbu", *read_hu(f)))
    for name in ("lungmask-testdata/tests/testdata/0.dcm", "lungmask-testdata/tests/testdata/1.dcm",
                 "dwv-testdata/tests/data/nema-ct1_jpll.dcm", "dwv-testdata/tests/data/dicompyler-ct.0.dcm"):
        out.append(HUSlice("zoo", *read_hu(DATA / "dicom-ct-zoo" / name)))
    for f in sorted(glob.glob(str(DATA / "dicom-ct-zoo" / "totalsegmentator-example_ct_dicom" / "**" / "CT*"), recursive=True)):
        out.append(HUSlice("zoo-ts", *read_hu(f)))
    for f in sorted(glob.glob(str(DATA / "dicom-ct-zoo" / "dcm_qa_ct" / "In" / "**" / "*"), recursive=True)):
        if os.path.isfile(f):
            out.append(HUSlice("zoo-head", *read_hu(f)))
    # the abdomen volume only: the chest volume is a crop inside the body (no outline, lungs cut by the field of
    # view), unlike any export, and the labeler cannot see its lungs
    sl, pa = nifti_slices(DATA / "totalsegmentator-ct-nifti" / "tests/reference_files/example_ct.nii.gz")
    out += [HUSlice("ts-abdomen", s, pa) for s in sl[::2]]
    zen = DATA / "zenodo-coronacases001-hu-slices" / "notebooks" / "data"
    for k in (98, 122):
        hu = np.load(zen / f"coronacases_001_image_slice_{k}.npy").astype(np.float32)
        out.append(HUSlice("zenodo", np.rot90(hu, -1).copy(), 0.5))
    return out


def prepare_valid_area(cache: Path = CACHE, version: int = 1) -> Path:
    """Full slices (lung window, VALID_SIZE²) with classical lung masks as labels.

    version 2 adds the COVID-CT-MD pneumonia series cap001 (Siemens, JPEG Lossless, 2 mm: lung bases beside a
    large gas-filled stomach and colon, where valid-area 1.3.3 boxed the stomach and missed the basal lung), and
    drops from every label the mask components whose mean is below GAS_MEAN_HU (gas, as the appliance does).
    version 3 adds diseased lung to the labels: the HU labeler stops at −320 HU, so consolidation and the dense,
    dependent opacity of a severely diseased lung were taught as "not lung" (NY-SBU's severe COVID-19 slices,
    cap001's consolidation). Where the labeler finds lung, the lesion boxes the appliance keeps on that slice
    (`lesion_teacher`: the shipped bundles) join the label, inside the body and below bone density.
    P001 stays out: it is the check."""
    out = cache / (f"valid_area_{VALID_SIZE}.npz" if version == 1 else f"valid_area{version}_{VALID_SIZE}.npz")
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    X, Y, src, split = [], [], [], []
    slices = valid_area_slices()
    teacher = lesion_teacher() if version >= 3 else None
    if version >= 2:
        slices += [HUSlice("cap001", hu, pa) for hu, pa, _ in ctmd_series("cap001")]
    for k, s in enumerate(slices):
        hu = s.hu
        r, c = hu.shape
        if r != c:  # pad to square with air so aspect is kept, as the appliance does
            n = max(r, c)
            pad = np.full((n, n), -1024.0, np.float32)
            pad[(n - r) // 2:(n - r) // 2 + r, (n - c) // 2:(n - c) // 2 + c] = hu
            hu = pad
        m = lung_mask(hu, s.pixel_area)
        if version >= 2:
            m = _drop_gas(m, hu)
        if version >= 3 and m.any():
            m = _with_lesion(m, hu, s.pixel_area, teacher)
        X.append(to_uint8(resize(window(hu), (VALID_SIZE, VALID_SIZE))))
        Y.append((resize(m.astype(np.float32), (VALID_SIZE, VALID_SIZE)) > 0.5).astype(np.uint8) * 255)
        src.append(s.source)
        split.append("val" if k % 5 == 0 else "train")
    np.savez_compressed(out, x=np.stack(X), y=np.stack(Y), src=np.array(src), split=np.array(split))
    return out


def lesion_teacher():
    """The shipped appliance analyzer (valid area + lesion), to find diseased lung for the valid-area labels."""
    from appliance.config import AnalysisConfig
    from appliance.pipeline.analyzer import Analyzer

    return Analyzer.load(AnalysisConfig(backend="auto", workers=1))


def _with_lesion(mask: np.ndarray, hu: np.ndarray, pixel_area: float, teacher) -> np.ndarray:
    """The lung label with the lesions the appliance keeps on this (square) slice added: inside the body, below
    bone density, holes filled."""
    from scipy import ndimage as ndi

    from appliance.domain import SliceImage
    from appliance.pipeline.classic_lung import body_mask
    from appliance.pipeline.grading import lesion_at_slice

    sp = float(np.sqrt(pixel_area))
    img = SliceImage("teacher", "", "", 0.0, hu=hu.astype(np.float32), pixel_spacing=(sp, sp))
    (f,) = teacher.findings([img], keep_prob=True)
    if not f.boxes or f.prob is None:
        return mask
    les = lesion_at_slice(f.prob.astype(np.float32), teacher.lesion.threshold, f.prob_rect,
                          [b.rect for b in f.boxes], hu.shape)
    les &= body_mask(hu) & (hu < 300.0)
    return ndi.binary_fill_holes(mask | les)


def _drop_gas(mask: np.ndarray, hu: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    from appliance.pipeline.valid_area import GAS_MEAN_HU

    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    means = ndi.mean(hu, lab, index=np.arange(1, n + 1))
    return np.isin(lab, [i + 1 for i, v in enumerate(means) if v >= GAS_MEAN_HU])


# ---------------------------------------------------------------- lesion model 2 additions

CTMD = DATA / "covid-ct-md"
CTMD_ROWS = {"P001": 0, "cap001": 55}  # rows of the slice / lobe label arrays (Index.csv)


def ctmd_series(patient: str) -> list[tuple[np.ndarray, float, int]]:
    """A COVID-CT-MD series as (HU, pixel area, radiologist slice label) in the labels' order (head first:
    SliceLocation highest first)."""
    import pydicom

    files = sorted(glob.glob(str(CTMD / patient / "*.dcm")))
    loc = [float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation) for f in files]
    labels = np.load(CTMD / "Slice-level-labels-updated-1.npy")[CTMD_ROWS[patient]]
    order = np.argsort(loc)[::-1]
    return [(*read_hu(files[k]), int(labels[r])) for r, k in enumerate(order)]


def doctor_classes() -> np.ndarray:
    """The radiologist slices' multi-class masks (0 background, 1 ground glass, 2 consolidation), LESION_SIZE²,
    in doctor_files order."""
    out = []
    for p in doctor_files():
        f = DATA / "covid-semiseg" / "TrainingSet" / "MultiClassInfection-Train" / "GT" / (Path(p).stem + ".png")
        a = np.asarray(Image.open(f))  # palette image: the indices are the classes
        out.append(np.asarray(Image.fromarray(a).resize((LESION_SIZE,) * 2, Image.NEAREST)))
    return np.stack(out)


def prepare_lesion2(cache: Path = CACHE, seed: int = 0) -> Path:
    """Model 2's cache: model 1's sources and split (`prepare_lesion`), plus
      hu-lidc     the LIDC-IDRI runs (GE thin slices around nodules): a nodule is not a COVID-19 lesion
    and `cls`, the radiologist slices' ground-glass / consolidation classes (for per-class Dice).
    COVID-CT-MD P001 (the one labelled COVID-19 DICOM series) is kept out: it is the real-DICOM validation.
    cap001's unlabelled slices are *not* used as negatives: its slice labels are conservative (the shipped model
    boxes the 21 consecutive unlabelled slices after the labelled pneumonia run, and a run of upper slices), so
    they would teach the model to miss pneumonia."""
    out = cache / f"lesion2_{LESION_SIZE}.npz"
    if out.exists():
        return out
    d = dict(np.load(prepare_lesion(cache, seed)))
    X, src, split, group = [], [], [], []
    for k, f in enumerate(sorted(glob.glob(str(DATA / "lidc-idri-samples" / "small" / "**" / "*.dcm"), recursive=True))):
        crop = hu_crop(*read_hu(f))
        if crop is not None:
            X.append(to_uint8(_fit(crop) / 255.0)), src.append("hu-lidc"), group.append(f"lidc-{k}")
            split.append("train")
    n = len(X)
    cls = np.zeros((len(d["x"]),) + d["x"].shape[1:], np.uint8)
    doc = np.flatnonzero(d["src"] == "doctor")
    cls[doc] = doctor_classes()
    np.savez_compressed(out, x=np.concatenate([d["x"], np.stack(X)]),
                        y=np.concatenate([d["y"], np.zeros((n,) + d["y"].shape[1:], np.uint8)]),
                        src=np.concatenate([d["src"], np.array(src)]), split=np.concatenate([d["split"], np.array(split)]),
                        group=np.concatenate([d["group"], np.array(group)]),
                        cls=np.concatenate([cls, np.zeros((n,) + cls.shape[1:], np.uint8)]))
    return out
