"""QC images of one patient, for a radiologist to check the input: the montage of the six stack channels and the
overview of the whole lesion slice, both with the lesion box and the patient-direction letters (A/P/S/I).

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
CHANNEL_NAMES = tuple(f"{w} {n}" for w in ROW_NAMES for n in TILE_NAMES)
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


def _text(draw: ImageDraw.ImageDraw, xy, text: str, size: int, fill=(255, 255, 255), anchor="la") -> None:
    # a dark outline keeps letters readable on bright marrow as on air
    draw.text(xy, text, font=font(size), fill=fill, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def draw_letters(draw: ImageDraw.ImageDraw, x: int, y: int, w: int, h: int, letters: dict[str, str], size=15) -> None:
    """Patient-direction letters at the middle of each edge of the image at (x, y, w, h)."""
    inset = 4
    _text(draw, (x + inset, y + h // 2), letters["left"], size, LETTER, "lm")
    _text(draw, (x + w - inset, y + h // 2), letters["right"], size, LETTER, "rm")
    _text(draw, (x + w // 2, y + inset), letters["top"], size, LETTER, "ma")
    _text(draw, (x + w // 2, y + h - inset), letters["bottom"], size, LETTER, "md")


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
        _text(draw, (pad, 4), title, 16)
    for c in range(6):
        img = np.clip(stack[c], 0.0, 1.0)
        im = Image.fromarray((img * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST).convert("RGB")
        x = pad + (c % 3) * (tile + pad)
        y = title_h + pad + (c // 3) * (tile + pad + label_h)
        _text(draw, (x, y + 2), CHANNEL_NAMES[c], 16)
        canvas.paste(im, (x, y + label_h))
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x + x0, y + label_h + y0, x + x1, y + label_h + y1], outline=BOX, width=2)
        draw_letters(draw, x, y + label_h, tile, tile, letters)
    return canvas


def overview_image(image: np.ndarray, box, crop, letters: dict[str, str] | None = None) -> Image.Image:
    """The whole lesion slice (uint8, already on the stack's axes) with the box (yellow), the tiles' field of view
    (thin blue) and the letters."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(im)
    draw.rectangle(list(crop), outline=CROP, width=1)
    draw.rectangle(list(box), outline=BOX, width=2)
    draw_letters(draw, 0, 0, im.width, im.height, letters or DEFAULT_LETTERS, size=14)
    return im


def save_png(image: Image.Image, path) -> None:
    # fast zlib level: QC images are written per patient and read by people, not archived
    image.save(path, format="PNG", compress_level=1)


def save_montage(stack: np.ndarray, box, path: Path, letters=None, title: str = "") -> None:
    save_png(montage(stack, box, letters, title), path)
