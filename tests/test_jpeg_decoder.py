"""The imagecodecs JPEG Lossless plugin: the same pixels as pydicom's own decoders, used first, with a fallback."""
import glob
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless

from appliance.ingest import jpeg_decoder
from appliance.ingest.dicom_reader import Rejected, hounsfield
from appliance.jpeg_lossless import encode
from appliance.phantom import ct_slice_dataset
from tests.conftest import shared_data

imagecodecs = pytest.importorskip("imagecodecs", reason="imagecodecs is not installed: the plugin is not used")


def dataset(stored: np.ndarray, stream: bytes, ts: str = JPEGLosslessSV1, signed: bool = False,
            bits_stored: int = 12) -> pydicom.Dataset:
    """A CT slice whose pixel data is `stream` (its stored values `stored`), as a parsed file would be."""
    ds = ct_slice_dataset(np.zeros(stored.shape, np.float32), study_uid="1.2.3", series_uid="1.2.3.4", instance=1,
                          z_mm=0.0, spacing_mm=(0.7, 0.7), thickness_mm=1.0, description="codec test")
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def by_pydicom(ds: pydicom.Dataset) -> np.ndarray:
    """What pydicom's own plugins (pylibjpeg, gdcm) make of it, the reference."""
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    others = [p for p in decoder.available_plugins if p != jpeg_decoder.PLUGIN]
    ds.pixel_array_options(decoding_plugin=others[0])
    try:
        return ds.pixel_array.copy()
    finally:
        ds.pixel_array_options(decoding_plugin="")


def by_plugin(ds: pydicom.Dataset) -> np.ndarray:
    """The plugin alone (no fallback): it must decode the stream itself."""
    assert jpeg_decoder.register()
    ds.pixel_array_options(decoding_plugin=jpeg_decoder.PLUGIN)
    try:
        return ds.pixel_array.copy()
    finally:
        ds.pixel_array_options(decoding_plugin="")


@pytest.mark.parametrize("shape,bits", [((512, 512), 12), ((37, 53), 16), ((64, 64), 10)])
def test_the_appliance_encoder_s_streams_decode_to_the_same_values(shape, bits):
    rng = np.random.default_rng(bits)
    stored = rng.integers(0, 1 << bits, shape).astype(np.uint16)
    stored[: shape[0] // 3] = 0  # a flat run next to noise, as padding beside a body
    ds = dataset(stored, encode(stored, bits), bits_stored=bits)
    a = by_plugin(ds)
    assert a.dtype == np.uint16
    np.testing.assert_array_equal(a, stored)
    np.testing.assert_array_equal(a, by_pydicom(ds))


@pytest.mark.parametrize("predictor", [2, 3, 4, 5, 6, 7])
def test_process_14_with_other_predictors(predictor):
    # 1.2.840.10008.1.2.4.57 allows predictors 1-7; libjpeg-turbo writes them too
    stored = np.random.default_rng(predictor).integers(0, 4096, (96, 80)).astype(np.uint16)
    stream = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=predictor, bitspersample=12)
    ds = dataset(stored, bytes(stream), ts=JPEGLossless)
    np.testing.assert_array_equal(by_plugin(ds), stored)
    np.testing.assert_array_equal(by_plugin(ds), by_pydicom(ds))


def test_signed_pixels_give_the_same_hounsfield_units():
    # PixelRepresentation 1: the stream holds the two's-complement bit patterns; pydicom restores the sign
    hu = np.random.default_rng(3).integers(-2048, 3000, (64, 64)).astype(np.int16)
    ds = dataset(hu, encode(hu.view(np.uint16), 16), signed=True, bits_stored=16)
    ds.RescaleIntercept = 0
    a = by_plugin(ds)
    assert a.dtype == np.int16
    np.testing.assert_array_equal(a, hu)
    np.testing.assert_array_equal(hounsfield(ds), np.maximum(hu, -1024).astype(np.float32))


@pytest.mark.parametrize("ts", [JPEG2000Lossless, JPEGLSLossless])
def test_jpeg_2000_and_jpeg_ls_lossless_slices_decode_to_their_values(ts):
    # compressed by pydicom's own encoders (pylibjpeg-openjpeg, pyjpegls), as the phantom writes them
    stored = np.random.default_rng(7).integers(0, 4096, (96, 112)).astype(np.uint16)
    ds = ct_slice_dataset(stored.astype(np.float32) - 1024, study_uid="1.2.3", series_uid="1.2.3.4", instance=1,
                          z_mm=0.0, spacing_mm=(0.7, 0.7), thickness_mm=1.0, description="codec test",
                          transfer_syntax=ts)
    a = by_plugin(ds)
    np.testing.assert_array_equal(a, stored)
    np.testing.assert_array_equal(a, by_pydicom(ds))


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm"])
def test_pydicom_s_signed_and_lossy_files_decode_as_pydicom_does(name):
    # signed pixels, a JPEG 2000 codestream whose signedness disagrees with Pixel Representation, lossy JPEG 2000
    # and near-lossless JPEG-LS
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID in (JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless)
    a, ref = by_plugin(ds), by_pydicom(pydicom.dcmread(path))
    assert a.dtype == ref.dtype
    np.testing.assert_array_equal(a, ref)


def test_colour_falls_back_to_pydicom_s_plugins():
    path = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless SV1, three samples
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1 and ds.SamplesPerPixel == 3
    with pytest.raises(RuntimeError, match="single-sample"):
        by_plugin(pydicom.dcmread(path))
    np.testing.assert_array_equal(jpeg_decoder.decode_pixels(ds), pydicom.dcmread(path).pixel_array)


def test_a_stream_the_plugin_refuses_is_read_by_pydicom(monkeypatch):
    # a codec failure cannot be caused with a valid stream: both imagecodecs entry points are made to fail
    stored = np.random.default_rng(5).integers(0, 4096, (48, 48)).astype(np.uint16)
    ds = dataset(stored, encode(stored, 12))

    def refuse(*a, **k):
        raise RuntimeError("refused")

    monkeypatch.setattr(jpeg_decoder.imagecodecs, "jpeg8_decode", refuse)
    monkeypatch.setattr(jpeg_decoder.imagecodecs, "ljpeg_decode", refuse)
    np.testing.assert_array_equal(jpeg_decoder.decode_pixels(ds), stored)
    assert ds._pixel_array_opts.get("decoding_plugin", "") == ""  # the dataset is left with pydicom's defaults


@pytest.mark.parametrize("cut", [3, 2])
def test_a_stream_cut_short_inside_a_whole_file_is_rejected_not_filled(cut):
    # the decoders fill the missing rows silently (measured: a third of the stream gives a "whole" slice); the
    # missing end-of-image marker is what tells
    stored = np.random.default_rng(6).integers(0, 4096, (48, 48)).astype(np.uint16)
    stream = encode(stored, 12)
    ds = dataset(stored, stream[: len(stream) // cut])
    with pytest.raises(Rejected, match=r"^pixel data could not be decoded .*no end-of-image marker"):
        hounsfield(ds)
    assert hounsfield(dataset(stored, stream)).shape == stored.shape  # the whole stream is read
    # padding after the marker, zeros or FF bytes as some writers add, is still a whole stream
    np.testing.assert_array_equal(jpeg_decoder.decode_pixels(dataset(stored, stream + b"\xff" * 5 + b"\x00")), stored)


def test_two_threads_decode_the_same_pixels():
    streams = []
    for seed in range(8):
        stored = np.random.default_rng(seed).integers(0, 4096, (128, 128)).astype(np.uint16)
        streams.append((stored, encode(stored, 12)))
    bad: list[int] = []

    def work(part):
        for k, (stored, stream) in part:
            if not np.array_equal(jpeg_decoder.decode_pixels(dataset(stored, stream)), stored):
                bad.append(k)

    items = list(enumerate(streams))
    ts = [threading.Thread(target=work, args=(items[i::2],)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert bad == []


def test_decoder_name_says_which_codec_runs():
    assert jpeg_decoder.decoder_name(JPEGLosslessSV1).startswith("imagecodecs ")
    assert "libjpeg_turbo" in jpeg_decoder.decoder_name(JPEGLossless)
    assert "openjpeg" in jpeg_decoder.decoder_name(JPEG2000Lossless).lower()
    assert "charls" in jpeg_decoder.decoder_name(JPEGLSLossless).lower()
    assert jpeg_decoder.decoder_name(pydicom.uid.ExplicitVRLittleEndian) == "pydicom"


def test_real_vendor_jpeg_files_decode_to_the_same_values():
    """Siemens (COVID-CT-MD, 12-bit) and GE (signed 16-bit) JPEG Lossless files, and the JPEG 2000 files (a
    20-slice Siemens series among them) of ../shared/data."""
    files = sorted(glob.glob(str(shared_data("covid-ct-md", "P001") / "*.dcm")))[::15]
    files += sorted(glob.glob(str(shared_data("dicom-ct-zoo")) + "/**/*", recursive=True))
    makers, syntaxes = set(), set()
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue
        if ds.get("file_meta") is None or ds.file_meta.TransferSyntaxUID not in jpeg_decoder.SYNTAXES:
            continue
        np.testing.assert_array_equal(by_plugin(ds), by_pydicom(pydicom.dcmread(p)), err_msg=p)
        makers.add((ds.get("Manufacturer"), int(ds.PixelRepresentation)))
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
    assert {"SIEMENS", "GE MEDICAL SYSTEMS"} <= {m for m, _ in makers} and 1 in {s for _, s in makers}, makers
    assert {JPEGLosslessSV1, JPEG2000Lossless, JPEG2000} <= syntaxes, syntaxes


def test_without_imagecodecs_pydicom_s_decoders_read_the_same_file(tmp_path):
    """A machine where imagecodecs cannot be imported (no wheel for it): the plugin stays out, pixels unchanged."""
    stored = np.random.default_rng(9).integers(0, 4096, (64, 64)).astype(np.uint16)
    dataset(stored, encode(stored, 12)).save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "imagecodecs.py").write_text("raise ImportError('no imagecodecs on this machine')\n")
    code = ("import sys, numpy as np, pydicom; from pydicom.uid import JPEGLosslessSV1;"
            "from appliance.ingest import jpeg_decoder as j; from appliance.ingest.dicom_reader import read_slice;"
            "s = read_slice(sys.argv[1]); print(j.decoder_name(JPEGLosslessSV1), j.register(), int(s.hu.sum()))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shim")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "slice.dcm")], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    name, registered, total = out.stdout.split()
    assert (name, registered) == ("pydicom", "False")
    ref = hounsfield(dataset(stored, encode(stored, 12)))
    assert int(total) == int(ref.sum())
