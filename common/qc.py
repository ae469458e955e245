"""QC montage: the six channels of a stack with the lesion box, for a radiologist to check the input at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CHANNEL_NAMES = ("T1 -1 (right)", "T1 0 (lesion)", "T1 +1 (left)", "T2 -1 (right)", "T2 0 (lesion)", "T2 +1 (left)")
MIN_TILE = 192


def montage(stack: np.ndarray, box: tuple[float, float, float, float]) -> Image.Image:
    """2×3 grid (T1 row, T2 row), each tile scaled to at least MIN_TILE px, the box in yellow on every tile."""
    size = stack.shape[-1]
    scale = max(1, int(np.ceil(MIN_TILE / size)))
    tile = size * scale
    pad, label_h = 4, 14
    canvas = Image.new("RGB", (3 * (tile + pad) + pad, 2 * (tile + pad + label_h) + pad), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for c in range(6):
        img = np.clip(stack[c], 0.0, 1.0)
        im = Image.fromarray((img * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST).convert("RGB")
        x = pad + (c % 3) * (tile + pad)
        y = pad + (c // 3) * (tile + pad + label_h)
        draw.text((x, y), CHANNEL_NAMES[c], fill=(255, 255, 255))
        canvas.paste(im, (x, y + label_h))
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x + x0, y + label_h + y0, x + x1, y + label_h + y1], outline=(255, 220, 0))
    return canvas


def save_montage(stack: np.ndarray, box, path: Path) -> None:
    # fast zlib level: a montage is written per patient and read by people, not archived
    montage(stack, box).save(path, format="PNG", compress_level=1)
