"""Key images: the slice in lung window with lung box, lesion boxes, quadrant and score drawn (PNG)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from appliance.domain import SliceFinding
from appliance.imaging import to_uint8, window

LESION = (255, 64, 32)
LUNG = (90, 200, 255)
QUAD_SHORT = {"upper-left": "UL", "upper-right": "UR", "lower-left": "LL", "lower-right": "LR"}


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "LiberationSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render(grey01: np.ndarray, finding: SliceFinding, title: str = "", max_size: int = 512,
           not_for_diagnosis: bool = True, text: bool = True) -> Image.Image:
    """RGB image of a slice ([0, 1] grey in display orientation) with the finding drawn on it.

    text=False: boxes and lung box only, no words burned in (title, box labels, footer): for an image shown small
    beside its own caption (the triage display's tile)."""
    g = to_uint8(grey01)
    img = Image.fromarray(np.stack([g, g, g], -1))
    h, w = g.shape
    scale = min(1.0, max_size / max(h, w)) if max_size else 1.0
    if scale != 1.0:
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    lw = max(2, int(round(3 * img.width / 512)))
    font = _font(max(12, int(img.width / 28)))
    s = lambda v: int(round(v * scale))  # noqa: E731
    if finding.lung is not None:
        r = finding.lung
        # dashed lung box and the quadrant cross at its centre
        for x0, y0, x1, y1 in ((r.x0, r.y0, r.x1, r.y0), (r.x0, r.y1, r.x1, r.y1), (r.x0, r.y0, r.x0, r.y1),
                               (r.x1, r.y0, r.x1, r.y1)):
            n = max(1, int(max(abs(x1 - x0), abs(y1 - y0)) * scale / 12))
            for i in range(0, n, 2):
                a, b = i / n, min(1.0, (i + 1) / n)
                d.line([s(x0 + (x1 - x0) * a), s(y0 + (y1 - y0) * a), s(x0 + (x1 - x0) * b), s(y0 + (y1 - y0) * b)],
                       fill=LUNG, width=1)
        cy, cx = r.center
        d.line([s(cx), s(r.y0), s(cx), s(r.y1)], fill=LUNG, width=1)
        d.line([s(r.x0), s(cy), s(r.x1), s(cy)], fill=LUNG, width=1)
    for b in finding.boxes:
        r = b.rect
        d.rectangle([s(r.x0), s(r.y0), s(r.x1), s(r.y1)], outline=LESION, width=lw)
        if not text:
            continue
        label = f"{QUAD_SHORT[b.quadrant]} {b.score:.2f}"
        ty = s(r.y0) - font.size - 4 if s(r.y0) > font.size + 6 else s(r.y1) + 2
        d.text((s(r.x0) + 1, ty + 1), label, fill=(0, 0, 0), font=font)
        d.text((s(r.x0), ty), label, fill=LESION, font=font)
    if title and text:
        d.text((7, 7), title, fill=(0, 0, 0), font=font)
        d.text((6, 6), title, fill=(255, 255, 255), font=font)
    if not_for_diagnosis and text:
        foot = "triage aid - not for diagnostic use"
        small = _font(max(10, int(img.width / 40)))
        d.text((6, img.height - small.size - 6), foot, fill=(255, 255, 0), font=small)
    return img


def slice_grey(hu: np.ndarray | None, window01: np.ndarray | None) -> np.ndarray:
    if hu is not None:
        return window(hu)
    assert window01 is not None
    return window01


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
