"""Composite images for people to look at: side-by-side comparisons, grids, labelled rows.

Every composite is RGB (:func:`for_display`): grayscale panels are shown grey, and RGBA panels over a light
checkerboard so their transparency is visible (the images themselves are written in their own mode by
:func:`sdvae.images.write.save_image`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from sdvae.images.write import to_pil

CHECKER = 8  # side in pixels of the checkerboard squares behind transparent panels


def for_display(image: Image.Image | torch.Tensor) -> Image.Image:
    """An image as an RGB panel: tensors through :func:`to_pil` (L, RGB or RGBA), grayscale as grey, alpha
    composited over a light grey checkerboard of :data:`CHECKER`-pixel squares."""
    pil = to_pil(image) if isinstance(image, torch.Tensor) else image
    if pil.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in pil.info:
        return pil.convert("RGB")
    width, height = pil.size
    cells = Image.new("L", (-(-width // CHECKER), -(-height // CHECKER)))
    cells.putdata([255 if (x + y) % 2 else 204 for y in range(cells.height) for x in range(cells.width)])
    board = cells.resize((cells.width * CHECKER, cells.height * CHECKER), Image.Resampling.NEAREST)
    board = board.crop((0, 0, width, height)).convert("RGBA")
    return Image.alpha_composite(board, pil.convert("RGBA")).convert("RGB")


def side_by_side(a: Image.Image | torch.Tensor, b: Image.Image | torch.Tensor,
                 labels: tuple[str, str] = ("original", "reconstruction")) -> Image.Image:
    """Put two images next to each other, each with a small label above it, for visual comparison.

    Args:
        a: left image (PIL, or a tensor in [-1, 1] as accepted by :func:`to_pil`), shown by :func:`for_display`.
        b: right image; may differ in size from ``a`` (both are top-aligned).
        labels: texts drawn above ``a`` and ``b``, in Pillow's default font.

    Returns:
        An RGB image on a white background with a 4-pixel gap between the panels.
    """
    left, right = (for_display(x) for x in (a, b))
    gap, margin = 4, 2
    # Labels scale gently with the image so they stay readable on large outputs without dominating
    # small ones; the bitmap fallback keeps this working on a Pillow built without FreeType.
    font = _default_font(max(10, min(48, max(left.height, right.height) // 40)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for text in labels]
    label_h = max(box[3] for box in boxes) + 2 * margin
    widths = [max(img.width, box[2] + 2 * margin) for img, box in zip((left, right), boxes, strict=True)]
    canvas = Image.new("RGB", (widths[0] + gap + widths[1], label_h + max(left.height, right.height)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for img, text, width in zip((left, right), labels, widths, strict=True):
        draw.text((x + margin, margin), text, fill="black", font=font)
        canvas.paste(img, (x, label_h))
        x += width + gap
    return canvas


def _default_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def image_grid(images: torch.Tensor | Iterable[Image.Image | torch.Tensor], nrow: int, padding: int = 2) -> Image.Image:
    """Tile same-size images row by row on a white background (``sdvae sample``).

    Args:
        images: a (N,C,H,W) tensor in [-1, 1] (C 1, 3 or 4), or PIL images / (C,H,W) tensors, all the same
            size; each shown by :func:`for_display`.
        nrow: images per row (≥ 1); the last row may be shorter.
        padding: white pixels between images and around the grid.

    Returns:
        An RGB image of ``nrow`` columns and ``ceil(N / nrow)`` rows.
    """
    tiles = [for_display(x) for x in images]
    if not tiles:
        raise ValueError("image_grid needs at least one image")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    width, height = tiles[0].size
    if any(t.size != (width, height) for t in tiles):
        raise ValueError("image_grid needs images of one size")
    cols, rows = min(nrow, len(tiles)), -(-len(tiles) // nrow)
    canvas = Image.new("RGB", (cols * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        canvas.paste(tile, (padding + c * (width + padding), padding + r * (height + padding)))
    return canvas


def labelled_rows(rows: Iterable[tuple[str, Iterable[Image.Image | torch.Tensor]]], padding: int = 2,
                  column_labels: Sequence[str] | None = None) -> Image.Image:
    """Rows of same-size images, each row with its label on the left (``sdvae interpolate``).

    Args:
        rows: (label, images) pairs; images are PIL or (C,H,W)/(1,C,H,W) tensors in [-1, 1], all one size,
            each shown by :func:`for_display`.
        padding: white pixels between images.
        column_labels: texts drawn centred above each column (e.g. ``t=0.50``); columns widen to fit a
            label wider than the images, which are then centred in their column.

    Returns:
        An RGB image: a label column (Pillow's default font, scaled with the image height), then the images,
        under a band of column labels when given.
    """
    prepared = [(label, [for_display(x) for x in images]) for label, images in rows]
    if not prepared or not all(images for _, images in prepared):
        raise ValueError("labelled_rows needs at least one row, each with at least one image")
    width, height = prepared[0][1][0].size
    if any(img.size != (width, height) for _, images in prepared for img in images):
        raise ValueError("labelled_rows needs images of one size")
    font = _default_font(max(10, min(48, height // 6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(measure.textbbox((0, 0), label, font=font)[2] for label, _ in prepared) + 4 * padding
    cols = max(len(images) for _, images in prepared)
    heads = list(column_labels or [])
    boxes = [measure.textbbox((0, 0), text, font=font) for text in heads]
    cell_w = max([width] + [box[2] + 2 * padding for box in boxes])
    head_h = max(box[3] for box in boxes) + 2 * padding if boxes else 0
    canvas = Image.new("RGB", (label_w + cols * (cell_w + padding) + padding,
                               head_h + len(prepared) * (height + padding) + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (text, box) in enumerate(zip(heads, boxes, strict=False)):
        draw.text((label_w + padding + c * (cell_w + padding) + (cell_w - box[2]) // 2, padding), text,
                  fill="black", font=font)
    for r, (label, images) in enumerate(prepared):
        top = head_h + padding + r * (height + padding)
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((2 * padding, top + (height - box[3]) // 2), label, fill="black", font=font)
        for c, img in enumerate(images):
            canvas.paste(img, (label_w + padding + c * (cell_w + padding) + (cell_w - width) // 2, top))
    return canvas
