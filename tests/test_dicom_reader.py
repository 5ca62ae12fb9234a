"""The reader on generated series, pydicom's bundled files and (when present) the real vendor zoo."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from appliance.ingest.dicom_reader import Rejected, load_pixels, read_slice, to_display
from appliance.jpeg_lossless import JPEG_LOSSLESS_SV1
from appliance.phantom import PhantomSpec, phantom_series, write_phantom

from .conftest import shared_data


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("one")
    spec = PhantomSpec(slices=3, seed=3)
    paths = write_phantom(d, spec)
    return paths[1], phantom_series(spec)[1]


def _variant(src: Path, dst: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def test_hu_from_generated_slice(one):
    path, hu = one
    img = read_slice(path)
    assert img.hu.shape == (512, 512) and img.hu.dtype == np.float32
    assert float(np.abs(img.hu - np.clip(hu, -1024, 3071)).max()) <= 0.5 + 1e-3
    assert img.pixel_spacing == (0.7, 0.7)
    assert img.series_uid and img.study_uid and img.sop_uid


def test_header_only_pass_leaves_pixels(one):
    path, _ = one
    img = read_slice(path, with_pixels=False)
    assert img.hu is None and img.position == pytest.approx(-5.0)


@pytest.mark.parametrize("syntax", [None, JPEG_LOSSLESS_SV1], ids=["explicit", "jpeg-lossless"])
def test_pixels_after_header_pass_parse_the_file_once(tmp_path, monkeypatch, syntax):
    path = write_phantom(tmp_path, PhantomSpec(slices=1, seed=4), **({"transfer_syntax": syntax} if syntax else {}))[0]
    full = read_slice(path).hu
    img = read_slice(path, with_pixels=False)
    assert img.source is not None
    parses = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parses.append(a) or real(*a, **k))
    load_pixels(img)
    assert parses == [] and img.source is None
    np.testing.assert_array_equal(img.hu, full)
    img.hu = None
    load_pixels(img)  # no kept header: the file is read again
    assert len(parses) == 1
    np.testing.assert_array_equal(img.hu, full)


def test_file_changed_after_header_pass_is_rejected_with_reason(tmp_path):
    a, b = write_phantom(tmp_path, PhantomSpec(slices=2, seed=6))
    ia, ib = read_slice(a, with_pixels=False), read_slice(b, with_pixels=False)
    a.write_bytes(a.read_bytes()[: a.stat().st_size - 4096])  # cut short: pixel data incomplete
    b.unlink()
    with pytest.raises(Rejected, match="pixel data|cannot read"):
        load_pixels(ia)
    with pytest.raises(Rejected, match="cannot read file"):
        load_pixels(ib)


@pytest.mark.parametrize("syntax", [JPEG_LOSSLESS_SV1, JPEG2000Lossless, RLELossless],
                         ids=["jpeg-lossless", "jpeg2000-lossless", "rle"])
def test_compressed_syntaxes_decode_to_same_hu(tmp_path, syntax):
    spec = PhantomSpec(slices=2, seed=5)
    plain = write_phantom(tmp_path / "plain", spec)
    comp = write_phantom(tmp_path / "comp", spec, transfer_syntax=syntax)
    assert pydicom.dcmread(comp[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_slice(plain[0]).hu, read_slice(comp[0]).hu)


def test_display_orientation_from_flipped_and_transposed_storage():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(to_display(a, [1, 0, 0, 0, 1, 0]), a)
    assert np.array_equal(to_display(a[:, ::-1], [-1, 0, 0, 0, 1, 0]), a)  # stored right-left mirrored
    assert np.array_equal(to_display(a[::-1, :], [1, 0, 0, 0, -1, 0]), a)  # stored feet-first / prone-like
    assert np.array_equal(to_display(a.T, [0, 1, 0, 1, 0, 0]), a)  # rows and columns swapped


def test_patient_position_is_read_and_absent_is_unknown(one, tmp_path):
    path, _ = one
    assert read_slice(path, with_pixels=False).patient_position == ""  # the generator writes none
    prone = _variant(path, tmp_path / "prone.dcm", PatientPosition="hfp ")
    assert read_slice(prone, with_pixels=False).patient_position == "HFP"


def test_mirrored_file_reads_back_in_display_orientation(one, tmp_path):
    path, _ = one
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array[:, ::-1].copy()
    ds.PixelData = arr.tobytes()
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    ds.save_as(tmp_path / "m.dcm")
    np.testing.assert_array_equal(read_slice(tmp_path / "m.dcm").hu, read_slice(path).hu)


def test_padding_value_clamped_to_air():
    img = read_slice(get_testdata_file("CT_small.dcm"))
    assert img.hu.min() >= -1024
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert raw.PixelPaddingValue == -2000


@pytest.mark.parametrize("name,reason", [
    ("MR_small.dcm", "modality MR"),
    ("SC_rgb_jpeg.dcm", "secondary capture"),
    ("rtdose.dcm", "RT dose"),
    ("test-SR.dcm", "structured report"),
])
def test_pydicom_non_ct_files_rejected_with_reason(name, reason):
    with pytest.raises(Rejected, match=reason):
        read_slice(get_testdata_file(name))


def test_specific_rejections(one, tmp_path):
    path, _ = one
    cases = {
        "localizer": (dict(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "localizer"),
        "coronal": (dict(ImageOrientationPatient=[1, 0, 0, 0, 0, -1]), "coronal"),
        "sagittal": (dict(ImageOrientationPatient=[0, 1, 0, 0, 0, -1]), "sagittal"),
        "tilted": (dict(ImageOrientationPatient=[1, 0, 0, 0, 0.9397, -0.342]), "tilted 20.0"),
        "noiop": (dict(ImageOrientationPatient=None), "ImageOrientationPatient"),
        "modality": (dict(Modality="PT"), "modality PT"),
    }
    for name, (changes, reason) in cases.items():
        p = tmp_path / f"{name}.dcm"
        ds = pydicom.dcmread(path)
        for k, v in changes.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(p)
        with pytest.raises(Rejected, match=reason):
            read_slice(p)


def test_eight_bit_and_garbage_and_truncated(one, tmp_path):
    path, _ = one
    ds = pydicom.dcmread(path)
    small = (ds.pixel_array >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = small.tobytes()
    ds.save_as(tmp_path / "8bit.dcm")
    with pytest.raises(Rejected, match="8-bit"):
        read_slice(tmp_path / "8bit.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x89PNG not dicom at all" * 50)
    with pytest.raises(Rejected, match="not a DICOM"):
        read_slice(tmp_path / "junk.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(Rejected, match="empty file"):
        read_slice(tmp_path / "empty.dcm")
    data = Path(path).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(Rejected):
        read_slice(tmp_path / "cut.dcm")


def test_real_zoo_every_file_read_or_rejected_with_reason():
    zoo = shared_data("dicom-ct-zoo")
    files = [p for p in sorted(zoo.rglob("*")) if p.is_file()]
    assert len(files) >= 30
    outcomes = {}
    for p in files:
        try:
            img = read_slice(p)
            assert img.hu is not None and np.isfinite(img.hu).all() and img.hu.min() >= -1024
            outcomes[p.name] = "ok"
        except Rejected as e:
            assert len(e.reason) > 10
            outcomes[p.name] = e.reason
    assert outcomes["nema-ct1_jpll.dcm"] == "ok"  # JPEG Lossless
    assert outcomes["nema-ct1_j2ki.dcm"] == "ok"  # JPEG 2000
    assert "localizer" in outcomes["CT_JPEG70.dcm"]
    assert "secondary capture" in outcomes["gdcm-CT-MONO2-8-abdo.dcm"]
    assert "tilted" in outcomes["10.dcm"]  # GE head with gantry tilt
    assert sum(v == "ok" for v in outcomes.values()) >= 25


@pytest.mark.parametrize("change", [
    {"SliceThickness": "abc"}, {"Rows": 300}, {"Columns": 600}, {"RescaleSlope": "zz"}, {"NumberOfFrames": "many"}, {"BitsAllocated": 12},
    {"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}, {"SamplesPerPixel": 3}, {"PixelData": b"\x00\x01"},
], ids=lambda c: next(iter(c)))
def test_malformed_headers_are_rejected_never_raised(one, tmp_path, change):
    import warnings

    from pydicom import config

    path, _ = one
    ds = pydicom.dcmread(path)
    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
        try:
            for k, v in change.items():
                if isinstance(v, str) or (isinstance(v, list) and any(isinstance(x, str) for x in v)):
                    # text where a number belongs: written with a text VR, as broken exporters do
                    ds.add_new(pydicom.datadict.tag_for_keyword(k), "LO", v)
                else:
                    setattr(ds, k, v)
            p = tmp_path / "bad.dcm"
            ds.save_as(p)
        finally:
            config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes
        with pytest.raises(Rejected) as e:
            read_slice(p)
    assert len(e.value.reason) > 10


def test_unparseable_optional_geometry_falls_back(one, tmp_path):
    """Bad PixelSpacing or ImagePositionPatient text: the slice is still read (default spacing, SliceLocation)."""
    path, _ = one
    ds = pydicom.dcmread(path)
    ds.add_new(pydicom.datadict.tag_for_keyword("PixelSpacing"), "LO", ["x", "y"])
    ds.add_new(pydicom.datadict.tag_for_keyword("ImagePositionPatient"), "LO", ["1", "b", "3"])
    ds.save_as(tmp_path / "g.dcm")
    img = read_slice(tmp_path / "g.dcm")
    assert img.pixel_spacing == (0.7, 0.7) and img.position == pytest.approx(float(ds.SliceLocation))


# -- truncated files: pydicom reads them without complaint, the reader says they are truncated -----------------
def _cut(src: str | Path, dst: Path, n: int) -> Path:
    dst.write_bytes(Path(src).read_bytes()[:n])
    return dst


@pytest.mark.parametrize("with_pixels", [True, False], ids=["pixels", "header-only"])
def test_cut_short_slices_are_rejected_as_truncated(tmp_path, with_pixels):
    ct = get_testdata_file("CT_small.dcm")  # 39206 bytes: pixel data at 6300 (32768 bytes), then 138 bytes more
    cases = [
        (2048, r"^truncated DICOM file: header ends before the pixel data \(2048 bytes\)$"),
        (6000, r"^truncated DICOM file: header ends before the pixel data \(6000 bytes\)$"),
        (-200, r"^pixel data truncated \(file cut short: 32706 of 32768 bytes\)$"),
        (20000, r"^pixel data truncated \(file cut short: 13700 of 32768 bytes\)$"),
    ]
    for n, reason in cases:
        with pytest.raises(Rejected, match=reason) as e:
            read_slice(_cut(ct, tmp_path / f"cut{n}.dcm", n), with_pixels=with_pixels)
        if n > 6000:
            assert e.value.series_uid == str(pydicom.dcmread(ct, stop_before_pixels=True).SeriesInstanceUID)


def test_cut_short_compressed_slice_is_rejected_as_truncated(tmp_path):
    path = write_phantom(tmp_path, PhantomSpec(slices=1, size=128, seed=2), transfer_syntax=JPEG_LOSSLESS_SV1)[0]
    for n in (-12, -100, 3000):  # pydicom drops the whole data set when the sequence delimiter is missing
        for with_pixels in (True, False):
            with pytest.raises(Rejected, match=r"^compressed pixel data truncated \(file cut short"):
                read_slice(_cut(path, tmp_path / "cut.dcm", n), with_pixels=with_pixels)


def test_other_reasons_are_unchanged(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # raw data: no image
    del ds.PixelData, ds.Rows, ds.Columns
    ds.save_as(tmp_path / "raw.dcm")
    with pytest.raises(Rejected, match="raw data, not an image"):
        read_slice(tmp_path / "raw.dcm")
    del ds.SOPClassUID
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.200.1"  # CT protocol: no image
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(Rejected, match=r"^no pixel data \(not an image\)$"):
        read_slice(tmp_path / "nopix.dcm")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
                                  "MR_small_RLE.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "phantom-jpeg-ls"])
def test_check_complete_at_every_cut_point(tmp_path, name):
    """Every cut of an image (byte by byte through the header, in steps through the pixel data) is incomplete; the
    whole file is complete, proven by its pixel data."""
    import warnings

    from appliance.ingest.completeness import check_complete

    if name.startswith("phantom"):
        src = write_phantom(tmp_path, PhantomSpec(slices=1, size=64, seed=1), transfer_syntax=JPEG_LOSSLESS_SV1)[0]
    else:
        src = Path(get_testdata_file(name))
    data = src.read_bytes()
    whole = check_complete(src)
    assert whole.why is None and whole.pixels
    cut = tmp_path / "cut.dcm"
    # a deflated file's last bytes follow the end of its deflate stream (the data set is whole without them)
    ends = 16 if name == "image_dfl.dcm" else 0
    points = sorted({*range(1, min(len(data), 1500)), *range(1500, len(data) - ends, 97), len(data) - 1 - ends})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in points:
            cut.write_bytes(data[:n])
            ext = check_complete(cut)
            assert ext.why is not None and not ext.pixels, (n, ext.why)


def test_check_complete_never_loads_pixel_data(tmp_path, monkeypatch):
    from appliance.ingest import completeness

    path = write_phantom(tmp_path, PhantomSpec(slices=1, seed=2))[0]
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(k) or real(*a, **k))
    ext = completeness.check_complete(path)
    assert ext.why is None and ext.pixels and "PixelData" not in ext.ds
    assert all(k.get("stop_before_pixels") and k.get("defer_size") for k in calls)


def test_non_image_objects_are_complete_when_whole(tmp_path):
    from appliance.ingest.completeness import check_complete

    for name in ("test-SR.dcm", "rtplan.dcm"):
        src = get_testdata_file(name)
        assert check_complete(src).why is None and not check_complete(src).pixels
        assert "cut short" in check_complete(_cut(src, tmp_path / "c.dcm", -3)).why
