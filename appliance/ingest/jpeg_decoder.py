"""A faster JPEG Lossless decoder for pydicom: imagecodecs (libjpeg-turbo 3), registered as a pydicom decoding plugin.

JPEG Lossless (process 14) is what many CT consoles export (Siemens among them). pydicom's own route for it,
pylibjpeg-libjpeg, takes about 10 ms for a 512² slice and holds the GIL while it does, so one worker's decode
stalls the other worker's Python and the header pass. libjpeg-turbo's lossless decoder (through imagecodecs)
takes 2–3 ms and releases the GIL. This module is a decoding plugin in pydicom's sense
(`is_available`, `DECODER_DEPENDENCIES`, `_decode_frame`; pydicom's "Pixel Data Decoder Plugins" guide), so pydicom
still does everything after the codestream (bits stored, sign, rescale is ours): the pixels are the same, only
the codec differs. `decode_pixels(ds)` tries it first and falls back to pydicom's own plugins on any failure,
so a stream libjpeg-turbo refuses is still read. Without imagecodecs installed, nothing changes.
"""
from __future__ import annotations

import threading

import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders import JPEGLosslessDecoder, JPEGLosslessSV1Decoder

PLUGIN = "ctriage-imagecodecs"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = {ts: ("numpy", "imagecodecs") for ts in SYNTAXES}

try:  # imagecodecs is a dependency of the appliance; a machine without it decodes as before
    import imagecodecs
except ImportError:  # pragma: no cover - exercised where imagecodecs is absent
    imagecodecs = None


def is_available(ts: str) -> bool:
    """True for the JPEG Lossless syntaxes when imagecodecs (with libjpeg-turbo's lossless decoder) is installed."""
    return imagecodecs is not None and ts in SYNTAXES and hasattr(imagecodecs, "jpeg8_decode")


def _decode_frame(src: bytes, runner) -> bytes:
    """One encoded frame → its stored values as little-endian bytes sized for the runner's Bits Allocated.

    Single-sample (monochrome) frames only: anything else raises, and pydicom's own plugins are used instead.
    """
    if runner.samples_per_pixel != 1:
        raise ValueError("only single-sample frames")
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
    """Add the plugin to pydicom's JPEG Lossless decoders once (pydicom's add_plugin is not thread-safe); True when
    it is available here."""
    global _registered
    with _lock:
        if _registered is None:
            for dec in (JPEGLosslessDecoder, JPEGLosslessSV1Decoder):
                if PLUGIN not in dec.available_plugins and PLUGIN not in dec.missing_dependencies:
                    dec.add_plugin(PLUGIN, (__name__, "_decode_frame"))
            _registered = all(PLUGIN in d.available_plugins for d in (JPEGLosslessDecoder, JPEGLosslessSV1Decoder))
        return _registered


def decoder_name(ts: str | None) -> str:
    """The codec `decode_pixels` uses first for a transfer syntax (for `ctriage bench` and logs)."""
    if ts in SYNTAXES and register():
        return f"imagecodecs {imagecodecs.__version__} ({imagecodecs.jpeg8_version()})"
    return "pydicom"


def check_end_marker(ds: pydicom.Dataset) -> None:
    """Raise ValueError when a JPEG Lossless frame does not end with the end-of-image marker (FF D9, then at most
    the zero padding to an even length). Every JPEG Lossless decoder at hand (libjpeg-turbo, imagecodecs' own,
    pylibjpeg-libjpeg) silently fills the missing rows of a stream cut short, so a slice with garbage rows would
    otherwise reach the models."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        if bytes(frame).rstrip(b"\x00")[-2:] != b"\xff\xd9":
            raise ValueError(f"frame {k + 1}'s JPEG stream has no end-of-image marker: cut short or corrupt")


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """`ds.pixel_array`, through this plugin first for JPEG Lossless (after `check_end_marker`); pydicom's own
    plugins if it fails."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts in SYNTAXES and "PixelData" in ds:
        check_end_marker(ds)
    if ts in SYNTAXES and register():
        try:
            ds.pixel_array_options(decoding_plugin=PLUGIN)
            return ds.pixel_array
        except Exception:
            pass
        finally:
            ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array
