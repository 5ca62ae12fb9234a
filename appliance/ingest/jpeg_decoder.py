"""Faster JPEG Lossless, JPEG 2000 and JPEG-LS decoding for pydicom: imagecodecs, as a pydicom decoding plugin.

JPEG Lossless (process 14) is what many CT consoles export (Siemens among them). pydicom's own route for it,
pylibjpeg-libjpeg, takes about 10 ms for a 512² slice and holds the GIL while it does, so one worker's decode
stalls the other worker's Python and the header pass. libjpeg-turbo's lossless decoder (through imagecodecs)
takes 2–3 ms and releases the GIL. For JPEG 2000 both routes are OpenJPEG (about 25 ms a slice), but
pylibjpeg-openjpeg holds the GIL and imagecodecs does not, so two workers decode side by side; the same for
JPEG-LS (CharLS either way, pyjpegls holds the GIL).

This module is a decoding plugin in pydicom's sense (`is_available`, `DECODER_DEPENDENCIES`, `_decode_frame`;
pydicom's "Pixel Data Decoder Plugins" guide): pydicom still does everything after the codestream (bits stored,
sign; rescale is ours), so the pixels are the same, only the codec differs. `decode_pixels(ds)` tries it first
and falls back to pydicom's own plugins on any failure, so a stream imagecodecs refuses (or a colour one) is
still read. Without imagecodecs installed, nothing changes.
"""
from __future__ import annotations

import threading

import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders import (JPEG2000Decoder, JPEG2000LosslessDecoder, JPEGLosslessDecoder,
                                     JPEGLosslessSV1Decoder, JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder)

PLUGIN = "ctriage-imagecodecs"
LOSSLESS_JPEG = (uid.JPEGLossless, uid.JPEGLosslessSV1)
J2K = (uid.JPEG2000Lossless, uid.JPEG2000)
JLS = (uid.JPEGLSLossless, uid.JPEGLSNearLossless)
SYNTAXES = LOSSLESS_JPEG + J2K + JLS
DECODER_DEPENDENCIES = {ts: ("numpy", "imagecodecs") for ts in SYNTAXES}

try:  # imagecodecs is a dependency of the appliance; a machine without it decodes as before
    import imagecodecs
except ImportError:  # pragma: no cover - exercised where imagecodecs is absent
    imagecodecs = None


DECODERS = (JPEGLosslessDecoder, JPEGLosslessSV1Decoder, JPEG2000LosslessDecoder, JPEG2000Decoder,
            JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder)
CODEC = {**{ts: "jpeg8" for ts in LOSSLESS_JPEG}, **{ts: "jpeg2k" for ts in J2K}, **{ts: "jpegls" for ts in JLS}}


def is_available(ts: str) -> bool:
    """True for the syntaxes above when imagecodecs (with its libjpeg-turbo, OpenJPEG and CharLS codecs) is there."""
    return imagecodecs is not None and ts in CODEC and hasattr(imagecodecs, CODEC[ts] + "_decode")


def _decode_frame(src: bytes, runner) -> bytes:
    """One encoded frame → its stored values as little-endian bytes sized for the runner's Bits Allocated (for JPEG
    2000 and JPEG-LS: the codestream's precision, as pydicom's own plugins for them do).

    Single-sample (monochrome) frames only: anything else raises, and pydicom's own plugins are used instead.
    """
    if runner.samples_per_pixel != 1:
        raise ValueError("only single-sample frames")
    ts = runner.transfer_syntax
    if ts in J2K or ts in JLS:
        if ts in J2K:
            arr = imagecodecs.jpeg2k_decode(src, numthreads=1)  # the workers already use every core
        else:
            arr = imagecodecs.jpegls_decode(src)
        # the container follows the codestream's precision, as pydicom's pylibjpeg-openjpeg and pyjpegls plugins
        # set it
        precision = runner.get_option("j2k_precision" if ts in J2K else "jls_precision", runner.bits_stored)
        runner.set_option("bits_allocated", 8 if 0 < precision <= 8 else 16 if precision <= 16 else 32)
    else:
        try:
            arr = imagecodecs.jpeg8_decode(src)
        except Exception:  # an older libjpeg-turbo without lossless support: imagecodecs' own lossless decoder
            arr = imagecodecs.ljpeg_decode(src)
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded {arr.shape}, expected ({runner.rows}, {runner.columns})")
    dtype = np.dtype("<u2") if runner.bits_allocated == 16 else np.dtype("u1") if runner.bits_allocated == 8 else None
    if dtype is None or arr.dtype.itemsize > dtype.itemsize:
        raise ValueError(f"{runner.bits_allocated}-bit pixels from a {arr.dtype} stream")
    return arr.astype(dtype, copy=False).tobytes()


_lock = threading.Lock()
_registered: bool | None = None


def register() -> bool:
    """Add the plugin to pydicom's JPEG Lossless, JPEG 2000 and JPEG-LS decoders once (pydicom's add_plugin is not
    thread-safe); True when it is available here."""
    global _registered
    with _lock:
        if _registered is None:
            for dec in DECODERS:
                if PLUGIN not in dec.available_plugins and PLUGIN not in dec.missing_dependencies:
                    dec.add_plugin(PLUGIN, (__name__, "_decode_frame"))
            _registered = all(PLUGIN in d.available_plugins for d in DECODERS)
        return _registered


def decoder_name(ts: str | None) -> str:
    """The codec `decode_pixels` uses first for a transfer syntax (for `ctriage bench` and logs)."""
    if ts in SYNTAXES and register():
        codec = getattr(imagecodecs, CODEC[ts] + "_version")()
        return f"imagecodecs {imagecodecs.__version__} ({codec})"
    return "pydicom"


def check_end_marker(ds: pydicom.Dataset) -> None:
    """Raise ValueError when a JPEG Lossless frame has no end-of-image marker (FF D9) among its last 16 bytes (room
    for padding). Every JPEG Lossless decoder at hand (libjpeg-turbo, imagecodecs' own, pylibjpeg-libjpeg) silently
    fills the missing rows of a stream cut short, so a slice with garbage rows would otherwise reach the models.
    In entropy-coded data an FF byte is followed by 00 or a restart marker (D0–D7), so FF D9 there is the end."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        if b"\xff\xd9" not in bytes(frame[-16:]):  # after any padding (0x00, or 0xFF from some writers)
            raise ValueError(f"frame {k + 1}'s JPEG stream has no end-of-image marker: cut short or corrupt")


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """`ds.pixel_array`, through this plugin first for single-sample JPEG Lossless (after `check_end_marker`),
    JPEG 2000 and JPEG-LS; pydicom's own plugins for colour data and where the plugin fails. (The end-marker
    check is measured on JPEG Lossless only.)"""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts in LOSSLESS_JPEG and "PixelData" in ds:
        check_end_marker(ds)
    # colour goes straight to pydicom's plugins: a refusal inside pydicom is logged as an error with its traceback
    if ts in SYNTAXES and ds.get("SamplesPerPixel", 1) == 1 and register():
        try:
            ds.pixel_array_options(decoding_plugin=PLUGIN)
            return ds.pixel_array
        except Exception:
            pass
        finally:
            ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array
