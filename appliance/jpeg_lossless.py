"""A small JPEG Lossless encoder (ITU T.81 process 14, first-order prediction, selection value 1).

pydicom has no encoder for this transfer syntax, yet it is what many CT consoles export. This one lets the
phantom, the tests and the benchmark produce real JPEG Lossless DICOM files, which the reader then decodes with
the pylibjpeg plugin. A fixed 5-bit Huffman code is used for the 17 difference categories: valid and simple,
not size-optimal.
"""
from __future__ import annotations

import struct

import numpy as np

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def encode(img: np.ndarray, precision: int = 16) -> bytes:
    """Encode a 2-D unsigned integer image (values < 2**precision) as a JPEG Lossless SV1 codestream."""
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError("expected a 2-D image")
    if not 2 <= precision <= 16:
        raise ValueError("precision must be 2..16")
    x = a.astype(np.int64)
    if x.min() < 0 or x.max() >= (1 << precision):
        raise ValueError("values out of range for the precision")
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    d = (x - pred) & 0xFFFF
    d = np.where(d >= 32768, d - 65536, d).ravel()
    mag = np.abs(d)
    ssss = np.zeros(mag.shape, np.int64)
    nz = mag > 0
    ssss[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    ssss = np.minimum(ssss, 16)
    extra = np.where(d >= 0, d, d - 1) & ((1 << ssss) - 1)
    extra = np.where(ssss == 16, 0, extra)  # category 16 carries no extra bits
    nextra = np.where(ssss == 16, 0, ssss)
    code = (ssss << nextra) | extra  # 5-bit Huffman code (= category) followed by the extra bits
    nbits = 5 + nextra
    width = int(nbits.max())
    shifts = nbits[:, None] - 1 - np.arange(width)[None, :]
    bits = ((code[:, None] >> np.maximum(shifts, 0)) & 1).astype(np.uint8)
    bits = bits[shifts >= 0]
    pad = (-bits.size) % 8
    if pad:
        bits = np.concatenate([bits, np.ones(pad, np.uint8)])
    data = np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00")

    out = bytearray(b"\xff\xd8")
    out += _segment(0xFFC3, struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0]))
    out += _segment(0xFFC4, bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17)))
    out += _segment(0xFFDA, bytes([1, 1, 0x00, 1, 0, 0]))
    out += data
    out += b"\xff\xd9"
    return bytes(out)
