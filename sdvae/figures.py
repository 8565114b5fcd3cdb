"""Images people look at: tensor → 8-bit PIL, atomic saving in any common format, comparisons.

The inverse of :mod:`sdvae.images` (which reads files into tensors): :func:`to_pil` maps a model-space
tensor in [-1, 1] back to 8-bit with rounding, :func:`save_image` writes atomically and never over an
input, and :func:`side_by_side` builds the labelled original|reconstruction image the CLI writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from sdvae.atomic import atomic_file
from sdvae.errors import UserError

PathLike = str | os.PathLike

# Extension → (Pillow format, save options). JPEG: quality 95 and no chroma subsampling, so a saved
# reconstruction is not visibly worse than the tensor it came from; WebP: lossless for the same reason.
_SAVE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"lossless": True}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
}


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Convert a model-space image to an 8-bit RGB PIL image.

    Args:
        tensor: (3,H,W) or (1,3,H,W), any float dtype and device, nominally in [-1, 1]. Values
            outside are clamped; NaN becomes 0 (mid grey).

    Returns:
        An RGB image of size (W, H): ``round((x + 1) * 127.5)``, the inverse of :func:`load_image`
        for 8-bit inputs (rounding, not truncation, so an 8-bit image survives a round trip exactly).
    """
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"to_pil takes one image, got a batch of {tensor.shape[0]}")
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"to_pil expects (3,H,W) or (1,3,H,W), got {tuple(tensor.shape)}")
    x = torch.nan_to_num(tensor.detach().float().cpu(), nan=0.0).clamp(-1, 1)
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels, "RGB")


def save_image(img: Image.Image | torch.Tensor, path: PathLike, *, protect: Iterable[PathLike] = ()) -> Path:
    """Write an image atomically; the format comes from the extension.

    Written with :func:`sdvae.atomic.atomic_file`: readers never see a half-written file, and a
    failed write leaves any existing file untouched and no temporary file behind.

    Args:
        img: a PIL image, or a (3,H,W)/(1,3,H,W) tensor in [-1, 1] (converted with :func:`to_pil`).
        path: destination; ``.png``, ``.jpg``/``.jpeg`` (quality 95, 4:4:4), ``.webp`` (lossless),
            ``.bmp``, ``.tif``/``.tiff`` (any case).
        protect: paths that must never be overwritten (the inputs). Compared after resolving
            symlinks and ``..``, and by inode when both exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: unknown extension, protected destination, destination is a folder, or the file
            system refuses the write. A missing folder is created.
    """
    dest = check_output_path(path, protect=protect)
    fmt_options = _SAVE_FORMATS[dest.suffix.lower()]
    pil = to_pil(img) if isinstance(img, torch.Tensor) else img
    fmt, options = fmt_options
    if pil.mode not in ("RGB", "RGBA", "L") or (fmt == "JPEG" and pil.mode == "RGBA"):
        pil = pil.convert("RGB")
    try:
        with atomic_file(dest) as tmp, open(tmp, "wb") as f:
            pil.save(f, format=fmt, **options)
    except OSError as err:
        raise UserError(f"{dest}: cannot write ({err.strerror or err})") from None
    return dest


def side_by_side(a: Image.Image | torch.Tensor, b: Image.Image | torch.Tensor,
                 labels: tuple[str, str] = ("original", "reconstruction")) -> Image.Image:
    """Put two images next to each other, each with a small label above it, for visual comparison.

    Args:
        a: left image (PIL, or a tensor in [-1, 1] as accepted by :func:`to_pil`).
        b: right image; may differ in size from ``a`` (both are top-aligned).
        labels: texts drawn above ``a`` and ``b``, in Pillow's default font.

    Returns:
        An RGB image on a white background with a 4-pixel gap between the panels.
    """
    left, right = (to_pil(x) if isinstance(x, torch.Tensor) else x.convert("RGB") for x in (a, b))
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



def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # e.g. a symlink loop: fall back to the inode check
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _default_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def image_grid(images: torch.Tensor | Iterable[Image.Image | torch.Tensor], nrow: int, padding: int = 2) -> Image.Image:
    """Tile same-size images row by row on a white background (``sdvae sample``).

    Args:
        images: a (N,3,H,W) tensor in [-1, 1], or PIL images / (3,H,W) tensors, all the same size.
        nrow: images per row (≥ 1); the last row may be shorter.
        padding: white pixels between images and around the grid.

    Returns:
        An RGB image of ``nrow`` columns and ``ceil(N / nrow)`` rows.
    """
    tiles = [to_pil(x) if isinstance(x, torch.Tensor) else x.convert("RGB") for x in images]
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


def labelled_rows(rows: Iterable[tuple[str, Iterable[Image.Image | torch.Tensor]]], padding: int = 2) -> Image.Image:
    """Rows of same-size images, each row with its label on the left (``sdvae interpolate``).

    Args:
        rows: (label, images) pairs; images are PIL or (3,H,W)/(1,3,H,W) tensors in [-1, 1], all one size.
        padding: white pixels between images.

    Returns:
        An RGB image: a label column (Pillow's default font, scaled with the image height), then the images.
    """
    prepared = [(label, [to_pil(x) if isinstance(x, torch.Tensor) else x.convert("RGB") for x in images])
                for label, images in rows]
    if not prepared or not all(images for _, images in prepared):
        raise ValueError("labelled_rows needs at least one row, each with at least one image")
    width, height = prepared[0][1][0].size
    if any(img.size != (width, height) for _, images in prepared for img in images):
        raise ValueError("labelled_rows needs images of one size")
    font = _default_font(max(10, min(48, height // 6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(measure.textbbox((0, 0), label, font=font)[2] for label, _ in prepared) + 4 * padding
    cols = max(len(images) for _, images in prepared)
    canvas = Image.new("RGB", (label_w + cols * (width + padding) + padding,
                               len(prepared) * (height + padding) + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(prepared):
        top = padding + r * (height + padding)
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((2 * padding, top + (height - box[3]) // 2), label, fill="black", font=font)
        for c, img in enumerate(images):
            canvas.paste(img, (label_w + padding + c * (width + padding), top))
    return canvas


def check_output_path(path: PathLike, *, protect: Iterable[PathLike] = ()) -> Path:
    """The checks :func:`save_image` makes before writing, for commands to run before any slow work.

    Raises:
        UserError: unknown extension, a protected destination (an input), or a destination that is a folder.
    """
    dest = Path(path)
    if dest.suffix.lower() not in _SAVE_FORMATS:
        known = ", ".join(sorted(_SAVE_FORMATS))
        raise UserError(f"{dest}: unknown image extension {dest.suffix or '(none)'!r}; use one of {known}")
    for guarded in protect:
        if _same_file(dest, Path(guarded)):
            raise UserError(f"{dest}: refusing to overwrite the input image {guarded}; choose another output path")
    if dest.is_dir():
        raise UserError(f"{dest}: is a folder; give an image file name")
    return dest
