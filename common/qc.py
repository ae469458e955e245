"""The QC image of one patient, for a radiologist to check the input: the overview of the whole lesion slice beside
the montage of the six stack channels, both with the lesion box and the patient-direction letters (A/P/S/I).

Tiles are labelled "T1W -1 (right)" etc.: the weighting keeps its W, so that "T1W 0" cannot read as "T10". The font is
Pillow's scalable built-in one (no font file to ship or download); the tiny bitmap font is the fallback only where
Pillow lacks FreeType.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE_NAMES = ("-1 (right)", "0 (lesion)", "+1 (left)")
ROW_NAMES = ("T1W", "T2W")
CHANNEL_NAMES = tuple(f"{w}  {n}" for w in ROW_NAMES for n in TILE_NAMES)
MIN_TILE = 192
BOX = (255, 220, 0)
CROP = (0, 200, 255)
LETTER = (120, 255, 120)
DEFAULT_LETTERS = {"left": "A", "right": "P", "top": "S", "bottom": "I"}


@functools.lru_cache(maxsize=4)
def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the bitmap font, small but readable
        return ImageFont.load_default()


@functools.lru_cache(maxsize=256)
def _stamp(text: str, size: int, fill: tuple) -> Image.Image:
    """The text rendered once (RGBA, cropped to its ink): the same few labels and letters go on every tile of every
    patient, and FreeType with an outline is the costly part of a montage. A dark outline keeps the text readable on
    bright marrow as on air."""
    f = font(size)
    stroke = 2 if isinstance(f, ImageFont.FreeTypeFont) else 0  # old Pillow's bitmap fallback: no outline
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=f, stroke_width=stroke)
    im = Image.new("RGBA", (x1 - x0, y1 - y0), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((-x0, -y0), text, font=f, fill=fill, stroke_width=stroke, stroke_fill=(0, 0, 0))
    return im


def _text(canvas: Image.Image, xy, text: str, size: int, fill=(255, 255, 255), anchor="la") -> None:
    """Paste `text` at xy; anchor as Pillow's: horizontal l/m/r, vertical a (top)/m/d (bottom) of the ink box."""
    stamp = _stamp(text, size, fill)
    w, h = stamp.size
    x = xy[0] - {"l": 0, "m": w // 2, "r": w}[anchor[0]]
    y = xy[1] - {"a": 0, "m": h // 2, "d": h}[anchor[1]]
    canvas.paste(stamp, (x, y), stamp)


def draw_letters(canvas: Image.Image, x: int, y: int, w: int, h: int, letters: dict[str, str], size=15) -> None:
    """Patient-direction letters at the middle of each edge of the image at (x, y, w, h)."""
    inset = 3
    _text(canvas, (x + inset, y + h // 2), letters["left"], size, LETTER, "lm")
    _text(canvas, (x + w - inset, y + h // 2), letters["right"], size, LETTER, "rm")
    _text(canvas, (x + w // 2, y + inset), letters["top"], size, LETTER, "ma")
    _text(canvas, (x + w // 2, y + h - inset), letters["bottom"], size, LETTER, "md")


def montage(
    stack: np.ndarray,
    box: tuple[float, float, float, float],
    letters: dict[str, str] | None = None,
    title: str = "",
) -> Image.Image:
    """2×3 grid (T1W row, T2W row), each tile scaled to at least MIN_TILE px, the box in yellow on every tile, the
    patient-direction letters on every tile, and an optional title line above."""
    letters = letters or DEFAULT_LETTERS
    size = stack.shape[-1]
    scale = max(1, int(np.ceil(MIN_TILE / size)))
    tile = size * scale
    pad, label_h = 4, 22
    title_h = 24 if title else 0
    canvas = Image.new("RGB", (3 * (tile + pad) + pad, title_h + 2 * (tile + pad + label_h) + pad), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        _text(canvas, (pad, 5), title, 16)
    for c in range(6):
        img = np.clip(stack[c], 0.0, 1.0)
        im = Image.fromarray((img * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST).convert("RGB")
        x = pad + (c % 3) * (tile + pad)
        y = title_h + pad + (c // 3) * (tile + pad + label_h)
        _text(canvas, (x, y + 4), CHANNEL_NAMES[c], 16)
        canvas.paste(im, (x, y + label_h))
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x + x0, y + label_h + y0, x + x1, y + label_h + y1], outline=BOX, width=2)
        draw_letters(canvas, x, y + label_h, tile, tile, letters)
    return canvas


def overview_image(image: np.ndarray, box, crop, letters: dict[str, str] | None = None) -> Image.Image:
    """The whole lesion slice (uint8, already on the stack's axes) with the box (yellow), the tiles' field of view
    (thin blue) and the letters."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(im)
    draw.rectangle(list(crop), outline=CROP, width=1)
    draw.rectangle(list(box), outline=BOX, width=2)
    draw_letters(im, 0, 0, im.width, im.height, letters or DEFAULT_LETTERS, size=14)
    return im


@functools.lru_cache(maxsize=1)
def _palette() -> Image.Image:
    """240 greys and the annotation colours: a QC image is grey MR plus a few colours, and a palette PNG encodes
    about four times faster than RGB (prepare writes one per patient in its workers)."""
    greys = [round(i * 255 / 239) for i in range(240)]
    colours = [(g, g, g) for g in greys] + [BOX, CROP, LETTER, (255, 255, 255)]
    colours += [(0, 0, 0)] * (256 - len(colours))
    pal = Image.new("P", (1, 1))
    pal.putpalette([c for rgb in colours for c in rgb])
    return pal


def qc_image(stack: np.ndarray, box, info=None, title: str = "") -> Image.Image:
    """The patient's QC picture: the whole lesion slice (overview, left) beside the montage of the six tiles; without
    QC details (a StackResult.qc) just the montage. One file per patient: prepare's workers write it with an fsync,
    and a second file per patient cost more than drawing it."""
    if info is None:
        return montage(stack, box, title=title)
    right = montage(stack, box, info.letters)
    left = overview_image(info.overview, info.overview_box, info.overview_crop, info.letters)
    pad, label_h = 4, 22
    top = 24 if title else 0
    width, height = left.width + 2 * pad + right.width, top + max(right.height, pad + label_h + left.height)
    canvas = Image.new("RGB", (width, height))
    if title:  # across the whole picture: series descriptions can be long; drawn directly, it differs per patient
        draw = ImageDraw.Draw(canvas)
        draw.text((pad, 5), title, font=font(16), fill=(255, 255, 255))
    _text(canvas, (pad, top + pad + 4), "T1W whole slice", 16)  # in line with the tiles' labels
    canvas.paste(left, (pad, top + pad + label_h))
    canvas.paste(right, (left.width + 2 * pad, top))
    return canvas


def save_png(image: Image.Image, path) -> None:
    # fast zlib level: QC images are written per patient and read by people, not archived
    if image.mode == "RGB":
        image = image.quantize(palette=_palette(), dither=Image.Dither.NONE)
    image.save(path, format="PNG", compress_level=1)


def save_montage(stack: np.ndarray, box, path: Path, info=None, title: str = "") -> None:
    save_png(qc_image(stack, box, info, title), path)
